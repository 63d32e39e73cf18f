"""Scale (issue 15): throughput with 1 and 2 local workers and with the Ray engine, bytes against
the full analysis, and peak memory on a 4 GiB checkpoint.

Checkpoints are generated (and streamed to disk) in a temporary directory under ``--dir``, of
trained-like float32 matrices (`trained`: a noise bulk and a few outlying singular values, so
that, as for every matrix of ../shared/checkpoints, 1e-2 needs nearly full rank).

- throughput: 16 matrices of 2048 x 2048 and 4 of 4096 x 4096 (0.5 GiB) compressed at tol 1e-2
  (default options) by ``hmcompress compress`` with ``--workers 1``, ``--workers 2``, ``--engine
  ray --address`` a running Ray head on 127.0.0.1 (`benchmarks.ray_head`, as many CPUs as this
  process may use: a user's cluster is up before the run) and ``--engine ray`` alone (a local
  cluster started, and stopped, by the run): wall time of the compression (the ``throughput`` of
  ``--json``: source bytes of the matrices over the seconds from opening the checkpoint to the
  file written; the process's start, a second or two, is left out) and of the whole process, peak
  memory of the process tree (with the head's processes, where its tasks run), and whether the
  files are byte-identical; with ``--repeat N`` the engines run N times, interleaved, and the
  fastest run of each is shown;
- bytes: one 2048 x 2048 matrix (and with ``--large`` one 4096 x 4096) compressed in this process,
  on one thread, by the fast analysis and by the full one (`compress_matrix(...,
  full_analysis=True)`);
- memory (``--large``): 64 matrices of 4096 x 4096 (4 GiB), ``--workers 2`` and on a running
  head: wall time and the peak memory of the process tree.

Every run also gives its CPU seconds (user and kernel, of the process and the worker processes it
waited for; not shown for Ray, whose workers are not): source MB per CPU second depends little on
what else the machine runs, where wall time does.

Peak memory of a process tree is sampled from /proc: the sum of the processes' PSS every 0.5 s
(proportional set size: pages shared between processes, such as torch's libraries, are split
among them; reading it walks every page table, which cost a third of a core at 50 ms) and, every
50 ms, the sum of their RSS (which counts shared pages once per process: an upper bound).

Usage: python -m benchmarks.scale [--large] [--repeat N] [--dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import print_table
from benchmarks.ray_head import RAY_ENV, descendants, local_head
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.io.pipeline import one_thread
from hmcompress.io.writer import StreamedTensor, write_streamed

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-2
SAMPLE_SECONDS = 0.05  # RSS of the process tree sampled this often
PSS_EVERY = 10  # ... and its PSS every this many samples (reading it costs a page-table walk)
PAGE = os.sysconf("SC_PAGE_SIZE")


def trained(seed: int, m: int, n: int, spikes: int = 32) -> torch.Tensor:
    """A trained-like matrix: a bulk of noise (Marchenko-Pastur spectrum) and a few outlying
    singular values, so that, as in every matrix of ../shared/checkpoints, keeping 1e-2 of
    its norm needs nearly full rank (rows of quantized numbers beat low rank)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(spikes, m, n)
    strength = torch.logspace(0.7, 0.2, k)  # 5x down to 1.6x the bulk's scale
    low = (torch.randn(m, k, generator=gen) * strength) @ torch.randn(k, n, generator=gen) / (m * n) ** 0.5 * 2
    return (low + torch.randn(m, n, generator=gen) / n ** 0.5).float()


def generate(path: pathlib.Path, shapes: list[tuple[int, int]], make=trained) -> pathlib.Path:
    """One matrix per shape, written one at a time (never all in memory)."""
    write_streamed(path, [StreamedTensor(f"layers.{i:02d}.weight", torch.float32, shape,
                                         lambda i=i, shape=shape: make(i, *shape)) for i, shape in enumerate(shapes)],
                   None)
    return path


@dataclasses.dataclass
class Run:
    """One ``hmcompress compress --json`` process: exit code, wall seconds of the process, the
    compression's own seconds and MB/s (from its JSON), peak summed PSS and RSS of its process
    tree (bytes, sampled), CPU seconds."""

    code: int
    wall: float
    seconds: float
    rate: float
    peak_pss: int
    peak_rss: int
    cpu: float  # CPU seconds (user + kernel) of the process and the descendants it waited for


def run(*args: object, cluster: int | None = None) -> Run:
    """``hmcompress compress ARGS --json``, its process tree sampled; with ``cluster`` (the pid of
    a running Ray head) the head's processes, where its tasks run, are counted too."""
    start = time.perf_counter()
    # Its JSON goes to a file, not a pipe: a report of many layers outgrows a pipe's buffer, and
    # the process would wait for a reader while this loop waits for it to end.
    report = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", "compress", *map(str, args), "--json", "--quiet"],
                            cwd=ROOT, stdout=report, stderr=subprocess.DEVNULL, text=True, env=RAY_ENV)
    pss = rss = 0
    samples = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree = [proc.pid, *descendants(proc.pid), *([cluster, *descendants(cluster)] if cluster else [])]
        rss = max(rss, sum(resident(p) for p in tree))
        if samples % PSS_EVERY == 0:  # PSS walks every page table: costly, so less often
            pss = max(pss, sum(memory(p, "Pss:") for p in tree))
        samples += 1
        time.sleep(SAMPLE_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)
    report.seek(0)
    out = report.read()
    report.close()
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime  # the process and the descendants it waited for
    if proc.returncode != 0:
        return Run(proc.returncode, wall, 0.0, 0.0, pss, rss, cpu)
    throughput = json.loads(out)["results"][0]["throughput"]
    return Run(0, wall, throughput["seconds"], throughput["mb_per_s"], pss, rss, cpu)


def resident(pid: int) -> int:
    """RSS of a process in bytes, from /proc/PID/statm (cheap; 0 for one that just ended)."""
    try:
        return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def memory(pid: int, field: str) -> int:
    """A field of /proc/PID/smaps_rollup in bytes (0 for a process that just ended)."""
    try:
        text = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(field)), 0)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


ENGINES = {  # label: the engine's options; "ray" runs against a head started for it (a user's cluster is up)
    "--workers 1": ("--workers", 1),
    "--workers 2": ("--workers", 2),
    "--engine ray, running head": "ray",
    "--engine ray, cluster started by the run": ("--engine", "ray"),
}


def engine_run(source: pathlib.Path, out: pathlib.Path, options: tuple | str) -> Run:
    """One compression with an engine of `ENGINES`; a Ray head is started (and waited for)
    beforehand and stopped afterwards for "ray"."""
    if options != "ray":
        return run(source, "-o", out, *options)
    with local_head(len(os.sched_getaffinity(0)), settled=True) as (address, pid):
        return run(source, "-o", out, "--engine", "ray", "--address", address, cluster=pid)


def cpu_figure(label: str, r: Run, size: int) -> str:
    """CPU seconds and MB per CPU second, where the run's workers are its waited-for children."""
    if "ray" in label:
        return ""
    return f"; {r.cpu:.0f} CPU s: {size / 1e6 / r.cpu:.1f} MB per CPU s"


def throughput_rows(directory: pathlib.Path, repeat: int) -> list[list[str]]:
    shapes = [(2048, 2048)] * 16 + [(4096, 4096)] * 4
    source = generate(directory / "mixed.safetensors", shapes)
    size = source.stat().st_size
    runs: dict[str, Run] = {}
    outputs = {}
    for _ in range(repeat):  # interleaved, the fastest of each kept: other tenants' load comes and goes
        for number, (label, options) in enumerate(ENGINES.items()):
            out = directory / f"mixed.{number}.hm.safetensors"
            result = engine_run(source, out, options)
            assert result.code == 0, label
            if label not in runs or result.rate > runs[label].rate:
                runs[label] = result
            outputs[label] = out.read_bytes()
            out.unlink()
    same = "byte-identical" if len(set(outputs.values())) == 1 else "DIFFERENT BYTES"
    rows = []
    for label, r in runs.items():
        rows.append([f"16 x 2048² + 4 x 4096² trained-like ({gib(size)}), tol {TOL:g}, {label}",
                     f"{r.rate:.1f} MB/s ({r.seconds:.1f} s; process {r.wall:.1f} s){cpu_figure(label, r, size)}",
                     f"{gib(r.peak_pss)} PSS ({gib(r.peak_rss)} RSS)"])
    local = runs["--workers 2"]
    for label in ENGINES:
        if "ray" in label:
            rows.append([f"{label} over --workers 2", f"{runs[label].rate / local.rate:.2f}x the throughput", same])
    rows.append(["--workers 2 over --workers 1", f"{local.rate / runs['--workers 1'].rate:.2f}x the throughput", same])
    return rows


def bytes_rows(large: bool) -> list[list[str]]:
    rows = []
    for side in (2048, 4096) if large else (2048,):
        w = trained(100, side, side)
        times, sizes = {}, {}
        for full in (False, True):
            start = time.perf_counter()
            with one_thread():  # as the workers compute (and no thread spins waiting for a busy core)
                sizes[full] = compress_matrix(w, CompressionOptions(tol=TOL), full_analysis=full).hmatrix.nbytes
            times[full] = time.perf_counter() - start
        rows.append([f"one trained-like {side}x{side}, tol {TOL:g}, fast analysis against full (one thread)",
                     f"{times[False]:.1f} s against {times[True]:.1f} s "
                     f"({times[True] / times[False]:.1f}x faster)",
                     f"{sizes[False]} bytes against {sizes[True]} ({sizes[False] / sizes[True] - 1:+.2%})"])
    return rows


def memory_rows(directory: pathlib.Path) -> list[list[str]]:
    """The 4 GiB checkpoint with two local workers, and on a running two-CPU Ray head."""
    source = generate(directory / "big.safetensors", [(4096, 4096)] * 64)
    size = source.stat().st_size
    rows, outputs, rates = [], [], {}
    for label in ("--workers 2", "--engine ray, running head"):
        out = directory / "big.hm.safetensors"
        r = engine_run(source, out, ENGINES[label])
        assert r.code == 0, label
        outputs.append(out.read_bytes())
        out.unlink()
        rates[label] = r.rate
        rows.append([f"64 trained-like 4096² ({gib(size)}), tol {TOL:g}, {label}",
                     f"{r.rate:.1f} MB/s, {r.seconds / 60:.1f} min (process {r.wall / 60:.1f} min)"
                     f"{cpu_figure(label, r, size)}",
                     f"{gib(r.peak_pss)} PSS ({gib(r.peak_rss)} RSS) = {r.peak_pss / size:.3f}x the file"])
    same = "byte-identical" if outputs[0] == outputs[1] else "DIFFERENT BYTES"
    rows.append(["4 GiB: --engine ray, running head, over --workers 2",
                 f"{rates['--engine ray, running head'] / rates['--workers 2']:.2f}x the throughput", same])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="also the 4 GiB checkpoint and a 4096² full analysis")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to generate checkpoints")
    parser.add_argument("--repeat", type=int, default=1, help="run the throughput set this many times, "
                        "interleaved, and keep each one's fastest run")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = pathlib.Path(tmp)
        rows = throughput_rows(directory, args.repeat) + bytes_rows(args.large)
        if args.large:
            rows += memory_rows(directory)
    cores = len(os.sched_getaffinity(0))
    print_table(f"Scale ({time.perf_counter() - start:.0f} s, {cores} cores)", ["measurement", "speed", "result"], rows)


if __name__ == "__main__":
    main()
