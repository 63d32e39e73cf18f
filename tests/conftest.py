"""Shared test machinery: the one in-process CLI runner, and one worker process by default.

The CLI runner calls the real console entry point (`hmcompress.cli.main`) inside the test process:
a subprocess costs ~2.5 s of imports, and the entry point, its error handling and its output are
the same; only the interpreter is shared. Tests use it as the ``cli`` fixture (session-scoped, so
fixtures of any scope may request it). A test that needs a real process (signals, a fresh
interpreter's start-up or imports, a process's own resources) says why beside its subprocess call.

``rich`` consoles in `hmcompress.cli` are created at import time without a file: they write to
whatever ``sys.stdout`` / ``sys.stderr`` are when they print, so redirecting those captures them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import warnings
from collections.abc import Callable

import pytest

WORKERS = "HMCOMPRESS_WORKERS"


@dataclasses.dataclass
class Run:
    """What a CLI run gave: exit code, stdout, stderr."""

    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The one line of a user error (the test fails if there is not exactly one)."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("hmcompress: error: "), lines[0]
        return lines[0]


def run_cli(*args: object) -> Run:
    """``hmcompress *args`` in this process. An exception the CLI does not turn into an exit code
    propagates (where a real process would print a traceback), failing the test."""
    from hmcompress import cli  # here, so that a broken import fails the tests that run the CLI only

    out, err = io.StringIO(), io.StringIO()
    argv, path, showwarning = sys.argv, sys.path[:], warnings.showwarning
    sys.argv = ["hmcompress", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:  # as the interpreter turns sys.exit(x) into an exit status
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
    finally:
        # main() installs its warning printer and may put the working directory on sys.path
        sys.argv, warnings.showwarning = argv, showwarning
        sys.path[:] = path
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli() -> Callable[..., Run]:
    """The in-process CLI: ``cli("compress", path, "-o", out)`` -> `Run`."""
    return run_cli


# ------------------------------------------------------------------------------------------------
# One worker process unless a test is about worker processes (@pytest.mark.workers).


@pytest.fixture(scope="session", autouse=True)
def _one_worker_for_the_session():
    """Also for module- and session-scoped fixtures, which run before any function's fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORKERS, "1")
        yield


@pytest.fixture(autouse=True)
def _one_worker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("workers"):
        monkeypatch.delenv(WORKERS, raising=False)  # the library's own default worker count
    else:
        monkeypatch.setenv(WORKERS, "1")
