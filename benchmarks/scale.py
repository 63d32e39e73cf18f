"""Scale: worker processes against one, and peak memory against the checkpoint's size.

- workers: wall time of `compress --workers 2` over `--workers 1` on a checkpoint of 16 matrices
  of 1024 x 1024 (the outputs must be byte-identical); the wall times include starting Python,
  torch and the worker processes (a few seconds), as a user sees them;
- per tensor: peak RSS (exact, from the kernel) of one process compressing one 2048 x 2048 matrix, over one compressing a
  64 x 64 one (what the work on a matrix adds to a process with torch loaded);
- memory: peak RSS of the whole `hmcompress compress` process tree (the parent and its workers,
  summed, sampled every 20 ms from /proc) on a generated checkpoint, beside the checkpoint's size
  and its largest tensor. ``--large`` generates 64 float32 matrices of 4096 x 4096 (4 GiB) of
  Gaussian noise, compressed with ``--precision keep --workers 1``: keep stores such matrices
  densely (as it does most trained weights at 1e-2), so the run is about streaming and memory,
  and takes about 40 s a matrix on one core.

Checkpoints are generated (and streamed to disk) in a temporary directory under ``--dir``.
Usage: python -m benchmarks.scale [--large] [--dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import print_table
from hmcompress.io.writer import StreamedTensor, write_streamed

ROOT = pathlib.Path(__file__).resolve().parents[1]
def weight(seed: int, m: int, n: int) -> torch.Tensor:
    """A weight-like matrix: a decaying spectrum with random singular vectors, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n) // 8
    u = torch.randn(m, k, generator=gen) * torch.logspace(0, -2, k)
    return (u @ torch.randn(k, n, generator=gen) / n ** 0.5 + 1e-3 * torch.randn(m, n, generator=gen)).float()


def trained(seed: int, m: int, n: int, spikes: int = 32) -> torch.Tensor:
    """A trained-like matrix: a bulk of noise (Marchenko-Pastur spectrum) and a few outlying
    singular values, so that, as in every matrix of ../shared/checkpoints, keeping 1e-2 of
    its norm needs nearly full rank (rows of quantized numbers beat low rank)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(spikes, m, n)
    strength = torch.logspace(0.7, 0.2, k)  # 5x down to 1.6x the bulk's scale
    low = (torch.randn(m, k, generator=gen) * strength) @ torch.randn(k, n, generator=gen) / (m * n) ** 0.5 * 2
    return (low + torch.randn(m, n, generator=gen) / n ** 0.5).float()


def noise(seed: int, m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) / n ** 0.5


def generate(path: pathlib.Path, count: int, m: int, n: int, make=weight) -> pathlib.Path:
    """``count`` m x n matrices, written one at a time (never all in memory)."""
    write_streamed(path, [StreamedTensor(f"layers.{i:02d}.weight", torch.float32, (m, n),
                                         lambda i=i: make(i, m, n)) for i in range(count)], None)
    return path


@dataclasses.dataclass
class Run:
    """One ``hmcompress`` process: exit code, wall seconds, peak summed RSS of its process tree
    (bytes, sampled), the largest peak RSS of any one process in it (bytes, the kernel's exact
    record), and the CPU seconds it and its workers spent in user code and in the kernel."""

    code: int
    wall: float
    peak: int
    largest_process_peak: int
    user: float
    system: float


def run(*args: object) -> Run:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(proc.returncode, time.perf_counter() - start, peak, usage.ru_maxrss * 1024, usage.ru_utime,
               usage.ru_stime)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 for one that just ended)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        children = [int(c) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return 0
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return rss + sum(tree_rss(child) for child in children)


def cpu(r: Run) -> str:
    return f"CPU {r.user:.0f} s user + {r.system:.0f} s kernel"


def workers_rows(directory: pathlib.Path) -> list[list[str]]:
    source = generate(directory / "sixteen.safetensors", 16, 1024, 1024)
    outputs, runs = {}, {}
    for workers in (1, 2):
        out = directory / f"sixteen.w{workers}.hm.safetensors"
        runs[workers] = run("compress", source, "-o", out, "--workers", workers, "--quiet")
        assert runs[workers].code == 0
        outputs[workers] = out.read_bytes()
    same = "byte-identical" if outputs[1] == outputs[2] else "DIFFERENT BYTES"
    return [["16 weight matrices 1024x1024, tol 1e-2 auto", "--workers 1",
             f"{runs[2].wall / runs[1].wall:.2f}x wall time ({same}); --workers 1: {runs[1].wall:.0f} s, "
             f"{cpu(runs[1])}"]]


def per_tensor_rows(directory: pathlib.Path) -> list[list[str]]:
    """What one matrix costs in memory: one process compressing it, over one compressing a tiny one."""
    side = 2048
    peaks = {}
    for n in (64, side):
        source = generate(directory / f"one{n}.safetensors", 1, n, n)
        result = run("compress", source, "-o", directory / f"one{n}.hm.safetensors", "--quiet", "--workers", 1)
        assert result.code == 0
        peaks[n] = result.largest_process_peak
    extra = peaks[side] - peaks[64]
    return [[f"one weight matrix {side}x{side}, tol 1e-2 auto, --workers 1", "the same process on a 64x64 one",
             f"peak RSS {peaks[side] / 2**30:.2f} GiB against {peaks[64] / 2**30:.2f} GiB: "
             f"{extra / (side * side * 4):.0f}x the float32 matrix"]]


def memory_rows(directory: pathlib.Path, large: bool) -> list[list[str]]:
    count, side, precision, workers, make = (64, 4096, "keep", 1, noise) if large else (12, 2048, "auto", 2, weight)
    source = generate(directory / "big.safetensors", count, side, side, make)
    size = source.stat().st_size
    out = directory / "big.hm.safetensors"
    r = run("compress", source, "-o", out, "--precision", precision, "--quiet", "--workers", workers)
    assert r.code == 0
    largest = side * side * 4
    return [[f"{count} {make.__name__} matrices {side}x{side} ({size / 2**30:.2f} GiB), tol 1e-2 {precision}, "
             f"--workers {workers}",
             "checkpoint size", f"peak RSS {r.peak / 2**30:.2f} GiB = {r.peak / size:.3f}x the file, "
             f"{r.peak / largest:.1f}x the largest tensor; {r.wall / 60:.1f} min, {cpu(r)}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="only the 4 GiB checkpoint (about 45 minutes)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to generate checkpoints")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = pathlib.Path(tmp)
        start = time.perf_counter()
        rows = (memory_rows(directory, True) if args.large else
                workers_rows(directory) + per_tensor_rows(directory) + memory_rows(directory, False))
    print_table(f"Scale ({time.perf_counter() - start:.0f} s)", ["measurement", "baseline", "result"], rows)


if __name__ == "__main__":
    main()
