"""Resource limits for tests: a cap on new memory, a stopwatch, and the processes a test left.

`memory_limit(extra)` sets RLIMIT_DATA to what the process holds now plus ``extra`` bytes, so an
allocation beyond that fails (torch raises, Python raises MemoryError) instead of quietly taking
the memory: passing under it proves the code never held more. Linux only (it reads /proc); a
no-op elsewhere.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import resource
import time
from collections.abc import Iterator


def data_segment() -> int:
    """Bytes of this process's data segment (heap and private mappings: what RLIMIT_DATA counts)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData")


@contextlib.contextmanager
def memory_limit(extra: int) -> Iterator[None]:
    """Make any allocation beyond ``extra`` more bytes than the process holds now fail."""
    if not pathlib.Path("/proc/self/status").exists():
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_segment() + extra
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as took:`` ... ``took[0]`` is the wall time in seconds."""
    took = [0.0]
    start = time.monotonic()
    try:
        yield took
    finally:
        took[0] = time.monotonic() - start


def children(pid: int | None = None) -> set[int]:
    """Live processes whose parent is ``pid`` (this process by default), from /proc."""
    pid = os.getpid() if pid is None else pid
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    found, frontier = set(), {pid}
    while frontier:
        below = set().union(*(children(p) for p in frontier)) - found
        found |= below
        frontier = below
    return found
