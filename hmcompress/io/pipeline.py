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
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
from collections.abc import Callable, Iterator

import torch

from hmcompress.core.build import CompressionOptions, as_matrix, compress_matrix
from hmcompress.io.checkpoint import Checkpoint, TensorEntry, open_checkpoint
from hmcompress.errors import USER_ERRORS, UserError
from hmcompress.runtime import MATRIX_DTYPE_NAMES, MATRIX_DTYPES, HMatrix, hmatrix_from_tensors
from hmcompress.core.stats import LayerStats, layer_stats
from hmcompress.core.verdicts import recorded_fields
from hmcompress.io.writer import StreamedTensor, matrix_entry, packed_tensors, write_streamed

NONFINITE = "non-finite values (NaN/Inf)"
WORK_SUFFIX = ".hmwork"
RESULT_FORMAT = 1  # bump when a result file's layout or meaning changes: old ones are then ignored
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
PR_SET_PDEATHSIG = 1  # Linux prctl option
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks of 32 MiB and more are mapped (and unmapped when freed)
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


def result_key(tensor: torch.Tensor, options: CompressionOptions) -> str:
    """Identifies a result: the tensor's exact contents and every option that shapes the output."""
    digest = hashlib.sha256()
    digest.update(json.dumps([RESULT_FORMAT, str(tensor.dtype), list(tensor.shape),
                              dataclasses.asdict(options)], sort_keys=True).encode())
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
        _trim()


def _run(job: Job) -> JobResult:
    tensor = _entry(job.source, job.tensor).load()
    if not bool(torch.isfinite(tensor).all()):
        if not job.passthrough_nonfinite:
            raise UserError(f"{job.source}: tensor {job.tensor!r} contains NaN or Inf values "
                            "(--passthrough-nonfinite copies such tensors unchanged)")
        return JobResult(job.name, reason=NONFINITE)
    if job.workdir is not None:  # a result is kept there, and reused on --resume
        key = result_key(tensor, job.options)
        path = WorkDir(pathlib.Path(job.workdir)).result(job.slot)
        stored = _stored_stats(path, key) if job.resume else None
        if stored is not None:
            return JobResult(job.name, stats=stored, reused=True)
    with one_thread():  # the bounds too: the residual's SVD also depends on the thread count
        result = compress_matrix(as_matrix(tensor), job.options)
        stats = layer_stats(job.name, tensor, result.hmatrix, result.dense, result.error, result.budget,
                            result.root_sigma, job.options, result.strategy).to_json()
    result.hmatrix.validate(job.name)
    if job.workdir is None:
        return JobResult(job.name, stats=stats)
    meta = {"key": key, "orig_shape": list(tensor.shape), "shape": list(result.hmatrix.shape),
            "stats": stats, "dtype": MATRIX_DTYPE_NAMES[result.hmatrix.dtype]}
    write_streamed(path, [StreamedTensor.of(part, t) for part, t in packed_tensors(result.hmatrix, "").items()],
                   {"result": json.dumps(meta, sort_keys=True, allow_nan=False)}, overwrite=True)
    return JobResult(job.name, stats=stats)


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


def _entry(source: str, name: str) -> TensorEntry:
    if source not in _OPENED:
        _OPENED.clear()  # one checkpoint at a time: its tensors may be memory-mapped
        _OPENED[source] = {e.name: e for e in open_checkpoint(source).entries}
    return _OPENED[source][name]


def read_result(path: pathlib.Path) -> tuple[dict, HMatrix]:
    """A result file's metadata and packed matrix, validated."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["result"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
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


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which stops handing out work), use one thread, and
    do not outlive a parent that is killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)
    release_large_blocks()


def _die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; a worker otherwise waits
    for work forever, since it holds an end of the queue it reads)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "prctl"):
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


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
    No-op elsewhere.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _trim() -> None:
    """Return freed heap pages to the system (glibc only) between tensors."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
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
    context = multiprocessing.get_context("spawn")  # fork after torch's threads start can hang
    with concurrent.futures.ProcessPoolExecutor(min(workers, total), mp_context=context,
                                                initializer=_worker_init) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                outcome = future.result()
                if progress:
                    progress(done, total, outcome.name)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]


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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(part)
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
