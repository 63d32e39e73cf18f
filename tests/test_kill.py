"""kill -9 in the middle of `compress`: no output file, and no temporary file after the next run.
Ctrl-C: the workers stop at once, one line says where the kept work is, --resume finishes it; and
the worker pool leaves no process behind, on errors and interrupts alike."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import random_checkpoint
from limits import children, descendants

from hmcompress.core.build import CompressionOptions
from hmcompress.errors import UserError
from hmcompress.io import pipeline
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
    return random_checkpoint(tmp_path_factory.mktemp("kill") / "model.safetensors", 4, 256)


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


# ------------------------------------------------------------------------------ Ctrl-C (issue 21)

@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory) -> pathlib.Path:
    """Six 1024 x 1024 matrices (24 MiB): a few seconds with two workers on a 2-core machine."""
    return random_checkpoint(tmp_path_factory.mktemp("long") / "model.safetensors", 6, 1024, seed=1)


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_ctrl_c_stops_two_workers_at_once_and_resume_finishes_the_same_file(cli, long_checkpoint, tmp_path):
    reference = tmp_path / "reference" / "model.hm.safetensors"
    reference.parent.mkdir()
    started = time.monotonic()
    assert cli("compress", long_checkpoint, "-o", reference, "--workers", "2", "--quiet").code == 0
    print(f"uninterrupted: {time.monotonic() - started:.1f} s")

    out = tmp_path / "model.hm.safetensors"
    work = tmp_path / f".{out.name}.hmwork"
    # A real process in a process group of its own, as a shell runs a command: Ctrl-C sends SIGINT
    # to the whole group, the workers included.
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", "compress", str(long_checkpoint), "-o", str(out),
                             "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=environment(), start_new_session=True)
    try:
        wait_for(lambda: work.is_dir() and any(p.suffix == ".safetensors" and not p.name.startswith(".")
                                                for p in work.iterdir()), 300, proc)
        workers = descendants(proc.pid)
        assert len(workers) == 2, workers  # both busy: the first result is in, four jobs are left
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and took < 5, (proc.returncode, took, stderr)
    (line,) = stderr.splitlines()
    assert re.fullmatch(rf"hmcompress: interrupted: nothing written to {re.escape(str(out))}; (1 compressed matrix "
                        rf"is|[2-5] compressed matrices are) kept in {re.escape(str(work))}: run the same command with "
                        r"--resume to go on", line), line
    assert stdout == ""
    assert not any(alive(pid) for pid in workers)
    assert not out.exists()

    run = cli("compress", long_checkpoint, "-o", out, "--workers", "2", "--resume", "--quiet")
    assert run.code == 0, run.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert not work.exists()


def _jobs(source: pathlib.Path, names: list[str]) -> list[pipeline.Job]:
    return [pipeline.Job(str(source), name, name, slot, CompressionOptions(), False, None, False)
            for slot, name in enumerate(names)]


@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_a_refused_job_stops_every_worker(tmp_path):
    before = children()
    source = tmp_path / "vanished.safetensors"  # each worker opens it, and refuses the job
    with pytest.raises(UserError, match="no such file"):
        with pipeline.WorkerPool(2) as pool:
            pool.run(_jobs(source, ["a", "b", "c"]), None)
    assert children() == before


@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_ctrl_c_in_the_parent_stops_every_worker(long_checkpoint):
    """Ctrl-C arrives when the first matrix is done, while the other worker still compresses
    (the progress callback runs before the next job is handed out)."""
    before = children()

    def interrupt(done: int, _total: int, _name: str | None) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with pipeline.WorkerPool(2) as pool:
            pool.run(_jobs(long_checkpoint, [f"layer{i}.weight" for i in range(6)]), interrupt)
    assert children() == before


@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_a_worker_killed_from_outside_stops_the_run_and_the_other_workers(long_checkpoint):
    """What the kernel's out-of-memory killer does: the run stops with a clear error, no worker
    is left. The worker still compressing when the first matrix is done is killed."""
    before = children()
    jobs = _jobs(long_checkpoint, [f"layer{i}.weight" for i in range(6)])
    with pipeline.WorkerPool(2) as pool:

        def kill_the_busy_one(done: int, _total: int, name: str | None) -> None:
            if done == 1:
                busy = next(w for w in pool.workers if w.job is not None and jobs[w.job].name != name)
                os.kill(busy.process.pid, signal.SIGKILL)

        with pytest.raises(pipeline.WorkerLost, match="ended without an answer .signal 9: out of memory"):
            pool.run(jobs, kill_the_busy_one)
    assert children() == before
