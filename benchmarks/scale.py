"""Scale: worker processes against one, and peak memory against the checkpoint's size.

- workers: wall time of `compress --workers 2` over `--workers 1` on a checkpoint of 16 matrices
  of 1024 x 1024 (the outputs must be byte-identical); the wall times include starting Python,
  torch and the worker processes (a few seconds), as a user sees them;
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
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import print_table
from hmcompress.writer import StreamedTensor, write_streamed

ROOT = pathlib.Path(__file__).resolve().parents[1]
def weight(seed: int, m: int, n: int) -> torch.Tensor:
    """A weight-like matrix: a decaying spectrum with random singular vectors, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n) // 8
    u = torch.randn(m, k, generator=gen) * torch.logspace(0, -2, k)
    return (u @ torch.randn(k, n, generator=gen) / n ** 0.5 + 1e-3 * torch.randn(m, n, generator=gen)).float()


def noise(seed: int, m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) / n ** 0.5


def generate(path: pathlib.Path, count: int, m: int, n: int, make=weight) -> pathlib.Path:
    """``count`` m x n matrices, written one at a time (never all in memory)."""
    write_streamed(path, [StreamedTensor(f"layers.{i:02d}.weight", torch.float32, (m, n),
                                         lambda i=i: make(i, m, n)) for i in range(count)], None)
    return path


def run(*args: object) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak summed RSS in bytes of the process tree) of ``hmcompress ARGS``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    return proc.returncode, time.perf_counter() - start, peak


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


def workers_rows(directory: pathlib.Path) -> list[list[str]]:
    source = generate(directory / "sixteen.safetensors", 16, 1024, 1024)
    outputs, walls = {}, {}
    for workers in (1, 2):
        out = directory / f"sixteen.w{workers}.hm.safetensors"
        code, walls[workers], _rss = run("compress", source, "-o", out, "--workers", workers, "--quiet")
        assert code == 0
        outputs[workers] = out.read_bytes()
    same = "byte-identical" if outputs[1] == outputs[2] else "DIFFERENT BYTES"
    return [["16 weight matrices 1024x1024, tol 1e-2 auto", "--workers 1", f"{walls[2] / walls[1]:.2f}x wall time ({same})"]]


def memory_rows(directory: pathlib.Path, large: bool) -> list[list[str]]:
    count, side, precision, workers, make = (64, 4096, "keep", 1, noise) if large else (12, 2048, "auto", 2, weight)
    source = generate(directory / "big.safetensors", count, side, side, make)
    size = source.stat().st_size
    out = directory / "big.hm.safetensors"
    code, wall, rss = run("compress", source, "-o", out, "--precision", precision, "--quiet", "--workers", workers)
    assert code == 0
    largest = side * side * 4
    return [[f"{count} {make.__name__} matrices {side}x{side} ({size / 2**30:.2f} GiB), tol 1e-2 {precision}, "
             f"--workers {workers}",
             "checkpoint size", f"peak RSS {rss / 2**30:.2f} GiB = {rss / size:.3f}x the file, "
             f"{rss / largest:.1f}x the largest tensor; {wall / 60:.1f} min"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="only the 4 GiB checkpoint (about 45 minutes)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to generate checkpoints")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = pathlib.Path(tmp)
        start = time.perf_counter()
        rows = memory_rows(directory, True) if args.large else workers_rows(directory) + memory_rows(directory, False)
    print_table(f"Scale ({time.perf_counter() - start:.0f} s)", ["measurement", "baseline", "result"], rows)


if __name__ == "__main__":
    main()
