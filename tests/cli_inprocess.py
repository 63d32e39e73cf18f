"""Running the real console entry point (`hmcompress.cli.main`) inside the test process.

A subprocess costs ~2.5 s of imports; the corpus tests run the CLI a hundred times. The entry
point, its error handling and its output are the same; only the interpreter is shared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import sys

from hmcompress import cli


@dataclasses.dataclass
class Run:
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
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["hmcompress", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return Run(code, out.getvalue(), err.getvalue())


def files_under(directory: pathlib.Path) -> set[pathlib.Path]:
    return {p.relative_to(directory) for p in directory.rglob("*")}
