"""kill -9 in the middle of `compress`: no output file, and no temporary file after the next run."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hmcompress.io.writer import _host, remove_stale_temporaries

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment() -> dict[str, str]:
    """This test's environment (read when the process starts: HMCOMPRESS_WORKERS is per test)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# The real CLI, stopped while the output's temporary file is written and not yet renamed (in the
# writer's fsync of that file): a deterministic "kill while writing", whatever writes the bytes.
STALLED_WRITER = r"""
import os, pathlib, sys, time

target = pathlib.Path(sys.argv[sys.argv.index("-o") + 1]).resolve()
real_fsync = os.fsync

def stalled_fsync(fd):
    path = pathlib.Path(os.readlink(f"/proc/self/fd/{fd}"))
    if path.parent == target.parent and path.name.startswith(f".{target.name}.") and path.name.endswith(".tmp"):
        print("writing", flush=True)
        time.sleep(600)
    real_fsync(fd)

os.fsync = stalled_fsync
from hmcompress.cli import main
sys.argv = ["hmcompress", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """Four 256 x 256 matrices: a few seconds of compression, reported matrix by matrix."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("kill") / "model.safetensors"
    save_file({f"layer{i}.weight": torch.randn(256, 256, generator=gen) for i in range(4)}, str(path))
    return path


@pytest.fixture(scope="module")
def reference(cli, checkpoint, tmp_path_factory) -> bytes:
    """The output of an undisturbed run, for comparison."""
    out = tmp_path_factory.mktemp("reference") / "model.hm.safetensors"
    assert cli("compress", checkpoint, "-o", out, "--quiet").code == 0
    return out.read_bytes()


def kill_when(command: list[str], stream: str, marker: str) -> None:
    """Start ``command``, wait until a line of ``stream`` starts with ``marker``, then SIGKILL it."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL} if stream == "stdout" else \
        {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    # A real process: it is sent SIGKILL.
    proc = subprocess.Popen(command, text=True, cwd=ROOT, env=environment(), **pipes)
    try:
        for line in getattr(proc, stream):
            if line.startswith(marker):
                break
        else:
            pytest.fail(f"{command} ended before printing {marker!r}")
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
        getattr(proc, stream).close()
    assert proc.returncode == -9


def leftovers(out: pathlib.Path) -> list[pathlib.Path]:
    """What a killed run left: never the output, only hidden working files of that output."""
    assert not out.exists()
    left = sorted(out.parent.iterdir())
    assert all(p.name.startswith(f".{out.name}.") for p in left), left
    return left


def rerun_and_check(cli, checkpoint: pathlib.Path, out: pathlib.Path, reference: bytes) -> None:
    run = cli("compress", checkpoint, "-o", out, "--quiet")
    assert run.code == 0, run.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["hmruntime.py", out.name]
    assert out.read_bytes() == reference
    assert cli("verify", out, "--original", checkpoint).code == 0


@pytest.mark.slow
@pytest.mark.workers  # the default worker processes of a user's run, killed with their parent
def test_kill_while_compressing(cli, checkpoint, reference, tmp_path):
    out = tmp_path / "model.hm.safetensors"
    kill_when([sys.executable, "-m", "hmcompress", "compress", str(checkpoint), "-o", str(out)], "stderr", "[1/4 ")
    leftovers(out)
    rerun_and_check(cli, checkpoint, out, reference)


@pytest.mark.slow
@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/fd").is_dir(), reason="the stalled writer needs /proc")
def test_kill_while_writing_leaves_a_temporary_that_the_next_run_removes(cli, checkpoint, reference, tmp_path):
    out = tmp_path / "model.hm.safetensors"
    kill_when([sys.executable, "-c", STALLED_WRITER, "compress", str(checkpoint), "-o", str(out), "--quiet"],
              "stdout", "writing")
    temporary = [p for p in leftovers(out) if p.name.startswith(f".{out.name}.{_host()}.")]
    assert len(temporary) == 1 and temporary[0].name.endswith(".tmp") and temporary[0].stat().st_size > 0
    rerun_and_check(cli, checkpoint, out, reference)


def test_only_temporaries_of_dead_writers_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "model.hm.safetensors"
    # Real processes: the pid of one that has ended, and of one that is still running.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = _host()
    try:
        names = {
            "dead writer": f".{target.name}.{host}.{dead}.k3x_9q.tmp",
            "live writer": f".{target.name}.{host}.{alive.pid}.k3x_9q.tmp",
            "other host": f".{target.name}.{host}-elsewhere.{dead}.k3x_9q.tmp",
            "other target": f".model.hm.{host}.{dead}.k3x_9q.tmp",
            "a user's file": f".{target.name}.notes.tmp",
            "extra field": f".{target.name}.{host}.{dead}.k3x.9q.tmp",
            "this process": f".{target.name}.{host}.{os.getpid()}.k3x_9q.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        assert remove_stale_temporaries(target) == [tmp_path / names["dead writer"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names.values()) - {names["dead writer"]})
    finally:
        alive.kill()
        alive.wait()
