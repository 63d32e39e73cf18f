"""Compressing every eligible tensor of a checkpoint: bounded memory, worker processes, resume.

Each tensor is read, compressed and measured on its own (in a worker process with ``workers`` >
1), and its result (packed matrix + stats) goes at once to a work directory beside the output.
The output is then assembled by streaming (`writer.write_assembled`): passthrough tensors straight
from the source and compressed ones from the work directory, one at a time. So peak memory is a
small multiple of the largest tensor (per worker), whatever the size of the checkpoint.

Every matrix is compressed with one intra-op thread: LAPACK's results depend on the thread count
in the last bits, and this keeps the output bytes the same for any ``workers`` (and any machine
core count). Results are keyed by the tensor's bytes, dtype and shape and by the options, so a
run restarted with ``resume`` reuses exactly the results an uninterrupted run would compute, and
writes the same file.

Worker processes are fresh interpreters started by `WorkerPool`, each given one job at a time
over a pipe: queued work never leaves the parent, so stopping is immediate. On any error, and on
Ctrl-C (which the workers ignore: the parent decides), every worker is terminated and waited for
before the exception goes on; a worker also dies with its parent (Linux), whatever kills it.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait

import torch
from safetensors import safe_open

from hmcompress.core.build import CompressionOptions, as_matrix, compress_matrix
from hmcompress.core.stats import LayerStats, layer_stats
from hmcompress.core.verdicts import recorded_fields
from hmcompress.core.weighted import ColumnMetric, InputWeights
from hmcompress.errors import USER_ERRORS, UserError
from hmcompress.io.activations import ActivationStats
from hmcompress.io.checkpoint import Checkpoint, TensorEntry, open_checkpoint
from hmcompress.io.writer import StreamedTensor, matrix_entry, packed_tensors, write_streamed
from hmcompress.runtime import (
    MATRIX_DTYPE_NAMES,
    MATRIX_DTYPES,
    HMatrix,
    hmatrix_from_tensors,
    open_regular,
    read_header,
    read_tensor,
)

NONFINITE = "non-finite values (NaN/Inf)"
OVERFLOW = "figures beyond float64's range (magnitudes too large to measure)"
WORK_SUFFIX = ".hmwork"
RESULT_FORMAT = 1  # bump when a result file's layout or meaning changes: old ones are then ignored
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
PR_SET_PDEATHSIG = 1  # Linux prctl option
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks of 32 MiB and more are mapped (and unmapped when freed)
TRIM_THRESHOLD_BYTES = 128 << 20  # free heap kept during a tensor's work (`trim_heap` returns it after)
WORKERS_VARIABLE = "HMCOMPRESS_WORKERS"  # the default worker count, where set
BYTES_PER_WORKER = 16 << 20  # a worker's start-up (~2.5 s) pays off from about this much matrix data


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs to compress one tensor (picklable)."""

    source: str
    name: str  # in the output
    tensor: str  # in the source (differs where `io.training` renames)
    slot: int  # position among the compressed tensors: names the result file
    options: CompressionOptions
    passthrough_nonfinite: bool
    workdir: str | None  # where the result is kept (None: nowhere, only its stats are wanted)
    resume: bool
    activations: str | None = None  # a calibration stats file: its G for this tensor sets the norm
    output_grams: str | None = None  # a safetensors file of K (or M) by name: rows rounded for the model's output


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What became of one job: compressed (``stats``) or passed through (``reason``)."""

    name: str
    stats: dict | None = None
    reason: str | None = None
    reused: bool = False


class WorkDir:
    """Where results wait for assembly: one safetensors file per compressed tensor.

    Beside the output it is ``.<output name>.hmwork``, where a restarted run can find it.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    @classmethod
    def beside(cls, output: pathlib.Path) -> "WorkDir":
        return cls(output.parent / f".{output.name}{WORK_SUFFIX}")

    def prepare(self, resume: bool) -> None:
        """Create it; without ``resume`` anything an earlier run left is removed first."""
        if not resume:
            self.remove()
        self.path.mkdir(exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def result(self, slot: int) -> pathlib.Path:
        return self.path / f"{slot:06d}.safetensors"

    def finished(self) -> int:
        """Results kept here (a result being written is a hidden temporary file, not counted)."""
        if not self.path.is_dir():
            return 0
        return sum(1 for p in self.path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))


def result_key(tensor: torch.Tensor, options: CompressionOptions,
               weights: InputWeights | ColumnMetric | None = None) -> str:
    """Identifies a result: the tensor's exact contents and every option that shapes the output
    (its calibration inputs' G, and what its rows are rounded for, included)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([RESULT_FORMAT, str(tensor.dtype), list(tensor.shape),
                              dataclasses.asdict(options), weights and weights.key()],
                             sort_keys=True).encode())
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def run_job(job: Job) -> JobResult:
    """Compress one tensor (or reuse its stored result); user errors come back as `UserError`."""
    try:
        return _run(job)
    except USER_ERRORS as err:  # some carry extra constructor arguments and would not unpickle
        raise UserError(str(err)) from None
    finally:
        trim_heap()


def _run(job: Job) -> JobResult:
    tensor = source_entry(job.source, job.tensor).load()
    weights = job_weights(job)
    reused = reused_result(job, tensor, weights) if job.resume else None
    if reused is not None:
        return reused
    return store_result(job, compress_tensor(job.name, job.source, job.tensor, tensor, job.options,
                                             job.passthrough_nonfinite, keyed=job.workdir is not None,
                                             weights=weights))


def job_weights(job: Job) -> InputWeights | ColumnMetric | None:
    """What the tensor is built for: the second moment of its calibration inputs, where the job's
    stats file has one, with its K where the job's output Grams have one; else the metric on its
    columns that file may have for it (`evaluate.output_grams`); else nothing (the plain build)."""
    weights = None
    if job.activations is not None:
        stats = ActivationStats.open(job.activations)
        if job.name in stats.names:
            weights = stats.weights(job.name, checked=False)  # every G was checked as the run began
    if job.output_grams is None:
        return weights
    with safe_open(job.output_grams, framework="pt") as f:
        if job.name not in f.keys():
            return weights
        gram = f.get_tensor(job.name)
    return ColumnMetric(gram) if weights is None else dataclasses.replace(weights, output_gram=gram)


@dataclasses.dataclass
class Packed:
    """One tensor compressed, ready to keep (picklable: it is what a Ray task returns): its stats
    and packed tensors, or the reason it passes through."""

    name: str
    stats: dict | None = None
    tensors: dict[str, torch.Tensor] | None = None
    meta: dict | None = None  # the result file's metadata
    reason: str | None = None


def compress_tensor(name: str, source: str, tensor_name: str, tensor: torch.Tensor, options: CompressionOptions,
                    passthrough_nonfinite: bool, keyed: bool, weights: InputWeights | ColumnMetric | None = None
                    ) -> Packed:
    """Compress one tensor on one thread (the same bytes wherever it runs); a tensor with NaN/Inf
    is refused (`UserError`) or, with ``passthrough_nonfinite``, passed through. ``keyed``: name
    the result by its tensor and options (`result_key`), for --resume. ``weights``: build for
    these calibration inputs (the data-aware budget), or round rows for this metric on columns."""
    if not bool(torch.isfinite(tensor).all()):
        if not passthrough_nonfinite:
            raise UserError(f"{source}: tensor {tensor_name!r} contains NaN or Inf values "
                            "(--passthrough-nonfinite copies such tensors unchanged)")
        return Packed(name, reason=NONFINITE)
    try:
        with one_thread():  # the bounds too: the residual's SVD also depends on the thread count
            result = compress_matrix(as_matrix(tensor), options, weights=weights)
            stats = layer_stats(name, tensor, result.hmatrix, result.dense, result.error, result.budget,
                                result.root_sigma, options, result.strategy, result.activation).to_json()
    except OverflowError:  # a norm beyond float64: no bound can be stated, so it is kept as it is
        return Packed(name, reason=OVERFLOW)
    result.hmatrix.validate(name)
    meta = {"key": result_key(tensor, options, weights) if keyed else None, "orig_shape": list(tensor.shape),
            "shape": list(result.hmatrix.shape), "stats": stats, "dtype": MATRIX_DTYPE_NAMES[result.hmatrix.dtype]}
    return Packed(name, stats, packed_tensors(result.hmatrix, ""), meta)


def reused_result(job: Job, tensor: torch.Tensor,
                  weights: InputWeights | ColumnMetric | None = None) -> JobResult | None:
    """The result an earlier run kept for this job's tensor and options (--resume), or None."""
    if job.workdir is None:
        return None
    stored = _stored_stats(WorkDir(pathlib.Path(job.workdir)).result(job.slot), result_key(tensor, job.options, weights))
    return JobResult(job.name, stats=stored, reused=True) if stored is not None else None


def store_result(job: Job, packed: Packed) -> JobResult:
    """Keep a compressed tensor in the work directory (where assembly and --resume find it)."""
    if packed.reason is not None:
        return JobResult(job.name, reason=packed.reason)
    if job.workdir is not None:
        path = WorkDir(pathlib.Path(job.workdir)).result(job.slot)
        write_streamed(path, [StreamedTensor.of(part, t) for part, t in packed.tensors.items()],
                       {"result": json.dumps(packed.meta, sort_keys=True, allow_nan=False)}, overwrite=True)
    return JobResult(job.name, stats=packed.stats)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: reductions in one fixed order, so figures do not depend on the
    machine's thread count (and two workers do not fight over two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_OPENED: dict[str, dict[str, TensorEntry]] = {}  # per process: source path -> entries by name


def use_checkpoint(source: str, ckpt: Checkpoint) -> None:
    """Let jobs run in this process read ``ckpt`` as already opened (not open it again)."""
    _OPENED.clear()
    _OPENED[source] = {e.name: e for e in ckpt.entries}


def source_entry(source: str, name: str) -> TensorEntry:
    """Tensor ``name`` of checkpoint ``source``, which this process opens once (`use_checkpoint`)."""
    if source not in _OPENED:
        _OPENED.clear()  # one checkpoint at a time: its tensors may be memory-mapped
        _OPENED[source] = {e.name: e for e in open_checkpoint(source).entries}
    return _OPENED[source][name]


def read_result(path: pathlib.Path) -> tuple[dict, HMatrix]:
    """A result file's metadata and packed matrix, validated (read by the runtime's own safetensors
    reader: any path the system can name, not only UTF-8 ones)."""
    header = read_header(path)
    meta = json.loads(header.metadata["result"])
    with open_regular(path) as f:
        tensors = {name: read_tensor(f, header, name) for name in header.tensors}
    hm = hmatrix_from_tensors(tensors, "", tuple(meta["shape"]), MATRIX_DTYPES[meta["dtype"]])
    hm.validate(str(path))
    return meta, hm


def _stored_stats(path: pathlib.Path, key: str) -> dict | None:
    """The stats of a stored result for ``key``; None if absent, stale or unreadable."""
    try:
        meta, _hm = read_result(path)
        recorded_fields(LayerStats, meta["stats"], str(path))
    except Exception:  # a result we cannot trust is recomputed, whatever is wrong with it
        return None
    return meta["stats"] if meta.get("key") == key else None


WORKER_STOP_SECONDS = 5.0  # a worker told to stop (SIGTERM) is killed after this long


def worker_main() -> None:
    """A worker process (`WorkerPool`): jobs in on one pipe, outcomes out on another, until the
    job pipe closes. Ctrl-C is left to the parent; the process dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # normally inherited already (see WorkerPool)
    jobs_fd, results_fd, parent = (int(arg) for arg in sys.argv[1:4])
    _die_with_parent(parent)
    torch.set_num_threads(1)
    release_large_blocks()
    jobs, results = Connection(jobs_fd, writable=False), Connection(results_fd, readable=False)
    while True:
        try:
            job = jobs.recv()
        except EOFError:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                outcome = ("done", run_job(job))
            except UserError as err:
                outcome = ("refused", str(err))
            except BaseException:  # a bug: the parent shows it and stops
                outcome = ("failed", traceback.format_exc())
        results.send((outcome, [str(w.message) for w in caught]))


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere a worker ends
    when its job pipe closes, at its next job)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


class WorkerLost(RuntimeError):
    """A worker process ended without an answer (killed: out of memory, a signal)."""


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this (main) thread for a moment: children started meanwhile inherit the
    disposition, so a Ctrl-C during their start-up never prints a traceback from them; cleanup
    run meanwhile is not cut short by a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Worker:
    def __init__(self) -> None:
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        command = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "from hmcompress.io.pipeline import worker_main; worker_main()",
                   str(job_read), str(result_write), str(os.getpid())]
        try:
            with _sigint_ignored():
                # stdout goes to stderr: the parent's stdout carries its data (--json)
                self.process = subprocess.Popen(command, pass_fds=(job_read, result_write), env=env,
                                                stdin=subprocess.DEVNULL, stdout=2)
        finally:
            os.close(job_read)
            os.close(result_write)
        self.jobs = Connection(job_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self.job: int | None = None  # index of the job it is working on

    def stop(self, now: bool) -> None:
        """Close its job pipe (it ends when idle); with ``now`` terminate it at once."""
        self.jobs.close()
        if now and self.process.poll() is None:
            self.process.terminate()

    def reap(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()


class WorkerPool:
    """``count`` worker processes (`worker_main`), each given one job at a time.

    `run` hands out jobs in order as workers become free; a job a worker refuses (`UserError`)
    or fails on stops the run. Leaving the ``with`` block, normally or by any exception
    (KeyboardInterrupt included), stops every worker, running ones at once, and waits for them.
    """

    def __init__(self, count: int) -> None:
        self.workers: list[_Worker] = []
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except BaseException:
            self.close(now=True)
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, _exc, _tb) -> None:
        self.close(now=exc_type is not None)

    def close(self, now: bool) -> None:
        with _sigint_ignored():
            for worker in self.workers:
                worker.stop(now or worker.job is not None)
            deadline = time.monotonic() + WORKER_STOP_SECONDS
            for worker in self.workers:
                worker.reap(deadline)

    def run(self, jobs: list[Job], progress: Callable[[int, int, str | None], None] | None) -> list[JobResult]:
        queue = collections.deque(range(len(jobs)))
        outcomes: list[JobResult | None] = [None] * len(jobs)
        by_pipe = {worker.results: worker for worker in self.workers}

        def hand_out(worker: _Worker) -> None:
            worker.job = queue.popleft() if queue else None
            if worker.job is not None:
                try:
                    worker.jobs.send(jobs[worker.job])
                except OSError:  # it ended meanwhile: its answer pipe says how, below
                    pass

        for worker in self.workers:
            hand_out(worker)
        done = 0
        while any(worker.job is not None for worker in self.workers):
            for pipe in wait([w.results for w in self.workers if w.job is not None]):
                worker = by_pipe[pipe]
                job = jobs[worker.job]
                try:
                    (status, payload), warned = pipe.recv()
                except (EOFError, OSError):
                    code = worker.process.wait()
                    raise WorkerLost(f"the worker compressing {job.tensor!r} ended without an answer "
                                     f"({'signal ' + str(-code) if code < 0 else 'exit code ' + str(code)}"
                                     f"{': out of memory?' if code == -signal.SIGKILL else ''})") from None
                for message in warned:
                    warnings.warn(message, stacklevel=2)
                if status == "refused":
                    raise UserError(payload)
                if status == "failed":
                    raise RuntimeError(f"a worker failed on {job.tensor!r}:\n{payload}")
                outcomes[worker.job] = payload
                done += 1
                if progress:
                    progress(done, len(jobs), payload.name)
                hand_out(worker)
        return outcomes


def release_large_blocks() -> None:
    """Make glibc give large freed blocks back to the system at once.

    Its default raises the mmap threshold after each large free, so the next matrix-sized
    temporaries come from the heap, which keeps the peak of every earlier tensor resident.
    A fixed threshold keeps the process's footprint at what it holds now. It is 32 MiB (glibc's
    own ceiling), not lower: at 1 MiB every medium temporary was mapped and unmapped again, and
    page faults took more time than the arithmetic (`/usr/bin/time hmcompress compress
    --workers 1` on `benchmarks.scale`'s 16 matrices of 1024x1024: 124 s wall, 69 s of it in the
    kernel, against 56 s and 8 s at 32 MiB; peak memory 10-30% higher; `benchmarks.scale` now
    prints the kernel's share).
    Freed heap memory is kept up to `TRIM_THRESHOLD_BYTES` while a tensor is worked on (the next
    temporaries reuse its pages instead of faulting fresh ones) and returned after each tensor
    (`trim_heap`): on a 2048 x 2048 matrix this took the kernel's time from 0.27 s to 0.08 s a tensor
    (page faults from 135,000 to 38,000) at the same peak. 128 MiB, not 256: two workers on
    4096 x 4096 matrices peaked at 1.21 GiB PSS against 1.34 GiB, at the same speed (64 MiB:
    no less memory, 2% slower). No-op elsewhere.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def trim_heap() -> None:
    """Return freed heap pages to the system (glibc only) between tensors."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """glibc through ctypes (looked up once: find_library runs a program), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def run_jobs(jobs: list[Job], workers: int, progress: Callable[[int, int, str | None], None] | None) -> list[JobResult]:
    """Run every job (in ``workers`` processes if more than one); outcomes in the jobs' order.

    ``progress(done, total, finished)`` is called once before any job (``finished`` None) and
    after each job finishes, with the count finished so far and that job's name.
    """
    total = len(jobs)
    if progress:
        progress(0, total, None)
    if workers <= 1 or total <= 1:
        release_large_blocks()
        outcomes = []
        for job in jobs:
            outcomes.append(run_job(job))
            if progress:
                progress(len(outcomes), total, job.name)
        return outcomes
    with WorkerPool(min(workers, total)) as pool:
        return pool.run(jobs, progress)


def assembled_tensors(ckpt: Checkpoint, outcomes: dict[str, JobResult], workdir: WorkDir,
                      slots: dict[str, int]) -> tuple[dict[str, dict], list[StreamedTensor]]:
    """The metadata table of the compressed matrices and every tensor of the output, to stream."""
    table, tensors = {}, []
    for entry in ckpt.entries:
        outcome = outcomes.get(entry.name)
        if outcome is None or outcome.stats is None:
            tensors.append(StreamedTensor(entry.name, entry.dtype, tuple(entry.shape), entry.load,
                                          f"passthrough tensor {entry.name!r}"))
            continue
        path = workdir.result(slots[entry.name])
        meta, hm = read_result(path)
        prefix = entry.name + ".hm."
        table[entry.name] = matrix_entry(hm, {"orig_shape": meta["orig_shape"], "stats": outcome.stats}, prefix)
        for part, tensor in packed_tensors(hm, "").items():
            tensors.append(StreamedTensor(prefix + part, tensor.dtype, tuple(tensor.shape),
                                          _loader(path, part), f"compressed matrix {entry.name!r}"))
    return table, tensors


def _loader(path: pathlib.Path, part: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        header = read_header(path)
        with open_regular(path) as f:
            return read_tensor(f, header, part)
    return load


def default_workers(source_bytes: int) -> int:
    """Worker processes the work justifies: ``HMCOMPRESS_WORKERS`` if set, else one per
    ``BYTES_PER_WORKER`` of matrices to compress, at most one per core this process may use.

    A worker costs seconds of start-up (imports), which small checkpoints never win back.
    """
    configured = os.environ.get(WORKERS_VARIABLE, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise UserError(f"{WORKERS_VARIABLE}={configured!r} must be a whole number >= 1")
        return int(configured)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, source_bytes // BYTES_PER_WORKER))
