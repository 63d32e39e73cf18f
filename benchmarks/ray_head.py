"""A Ray head of our own on 127.0.0.1, started and stopped around a benchmark or a test.

A user's cluster is up before `compress --engine ray --address ...` runs, so the benchmark times
the compression against a running head, as the tests check the engine against a real one (no
mocks). The head has its own temporary directory and port, and is stopped by terminating the
blocking ``ray start`` that started it: nothing else on the machine is touched.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

RAY = pathlib.Path(sys.executable).parent / "ray"
# The head and its clients agree on no token (Ray's token mode would read and write ~/.ray).
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
START_SECONDS = 60  # the head's raylet must be up within this
SETTLE_CPU = 0.05  # a started head is settled when its processes use less than this share of a core


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (none for one that just ended), from /proc."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(pathlib.Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def command_line(pid: int) -> str:
    """A process's command line ('' for one that ended)."""
    with contextlib.suppress(OSError):
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user and kernel) the processes have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def settle(pid: int, limit: float = START_SECONDS) -> None:
    """Wait until the process tree under ``pid`` is (nearly) idle: a head's agents and prestarted
    workers start up for some seconds after its raylet, which a timed run should not pay for."""
    deadline = time.monotonic() + limit
    before = cpu_seconds(descendants(pid))
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(descendants(pid))
        if now - before < SETTLE_CPU:
            return
        before = now


@contextlib.contextmanager
def local_head(cpus: int, settled: bool = False) -> Iterator[tuple[str, int]]:
    """A Ray head on 127.0.0.1 with ``cpus`` CPUs (that many worker processes): its address and
    the pid of the ``ray start`` process, below which its workers run; ``settled``: once its
    start-up work is over (`settle`)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    process = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                                f"--temp-dir={temp}", "--disable-usage-stats"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=RAY_ENV)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not any("raylet" in command_line(p) for p in descendants(process.pid)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed")
            time.sleep(0.2)
        if settled:
            settle(process.pid)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(temp, ignore_errors=True)
