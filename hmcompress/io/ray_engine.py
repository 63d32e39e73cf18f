"""Compressing a checkpoint's matrices as Ray tasks (``compress --engine ray``), on a cluster
beyond one machine or on a local one.

The driver (this process) reads each matrix and submits it as a task: its bytes travel through
Ray's object store, so the cluster's nodes need hmcompress installed but no access to the
checkpoint. A task compresses on one thread (`pipeline.compress_tensor`, as a local worker does)
and returns the packed result, which the driver keeps in the work directory exactly as the local
engine does: assembly in the input's order, ``--resume`` and the output bytes are the same. At
most `TASKS_PER_CPU` tasks per cluster CPU, plus one, are pending, so the driver and the object
store hold a bounded number of matrices. Ray retries a task whose worker process dies
(`MAX_RETRIES`). On Ctrl-C or any error, a connection made for this run is shut down, and the
cluster then stops this driver's tasks itself; on a connection the caller made, the pending
tasks are cancelled instead.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

from hmcompress.errors import USER_ERRORS, UserError
from hmcompress.io import pipeline

INSTALL_HINT = "pip install 'hmcompress[ray]' (or pip install ray)"
MAX_RETRIES = 3  # a task whose worker dies is run again this many times at most
TASKS_PER_CPU = 1  # tasks submitted per cluster CPU (plus one): every worker has its next matrix ready


def require_ray():
    """The ray module; a `UserError` saying how to install it where it is missing."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _shipped(tensor) -> tuple[object, str]:
    """A tensor as Ray ships best: a NumPy array of its bytes (stored once in the object store,
    read by workers without a copy) and its dtype's name (bfloat16 has no NumPy dtype)."""
    import torch

    flat = tensor.detach().contiguous()
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
    return raw.numpy(), str(flat.dtype).removeprefix("torch.")


def _unshipped(array, dtype: str):
    """The tensor `_shipped` sent, in memory of its own (the object store's copy is read-only)."""
    import torch

    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _task(job: pipeline.Job, array, dtype: str, weights=None) -> tuple[str, object]:
    """What runs on a Ray worker: one tensor compressed (``("done", Packed)``) or refused
    (``("refused", message)``); the worker gives large blocks back to the system between tasks.
    ``weights``: the tensor's calibration G, shipped with it (the stats file may not be there)."""
    pipeline.release_large_blocks()
    tensor = _unshipped(array, dtype)
    del array
    try:
        return "done", pipeline.compress_tensor(job.name, job.source, job.tensor, tensor, job.options,
                                                job.passthrough_nonfinite, keyed=job.workdir is not None,
                                                weights=weights)
    except USER_ERRORS as err:
        return "refused", str(err)
    finally:
        pipeline.trim_heap()


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[tuple[object, bool]]:
    """Ray, connected to the cluster at ``address`` (``auto``: the one this machine runs), or to a
    local cluster started for this run and shut down after it; and whether this connection is
    ours (made here, and closed on the way out) rather than the caller's."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray, False
        return
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
               "configure_logging": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if address is None:
                ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"--engine ray: cannot connect to a Ray cluster at {address or 'local'}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    try:
        yield ray, True
    finally:
        ray.shutdown()


def run_jobs(jobs: list[pipeline.Job], address: str | None,
             progress: Callable[[int, int, str | None], None] | None) -> list[pipeline.JobResult]:
    """Run every job as a Ray task; outcomes in the jobs' order (`pipeline.run_jobs`'s contract)."""
    total = len(jobs)
    if progress:
        progress(0, total, None)
    outcomes: list[pipeline.JobResult | None] = [None] * total
    with connected(address) as (ray, ours):
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_task)
        capacity = max(1, int(ray.cluster_resources().get("CPU", 1))) * TASKS_PER_CPU + 1
        pending: dict[object, int] = {}
        queued, done = 0, 0

        def finished(index: int, outcome: pipeline.JobResult) -> None:
            nonlocal done
            outcomes[index] = outcome
            done += 1
            if progress:
                progress(done, total, jobs[index].name)

        try:
            while queued < total or pending:
                while queued < total and len(pending) < capacity:
                    job = jobs[queued]
                    tensor = pipeline.source_entry(job.source, job.tensor).load()
                    weights = pipeline.job_weights(job)
                    reused = pipeline.reused_result(job, tensor, weights) if job.resume else None
                    if reused is not None:
                        finished(queued, reused)
                    else:
                        pending[remote.remote(job, *_shipped(tensor), weights)] = queued
                    queued += 1
                    del tensor
                if not pending:
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    index = pending.pop(ref)
                    status, payload = _result(ray, ref, jobs[index])
                    if status == "refused":
                        raise UserError(payload)
                    finished(index, pipeline.store_result(jobs[index], payload))
        finally:
            if pending and not ours:  # stopped early on the caller's connection: compute no more
                _cancel(ray, pending)
    return outcomes


def _cancel(ray, refs) -> None:
    """Stop tasks still pending on a connection that stays open. Only where it must: cancelling a
    task whose answer is arriving can abort the driver inside Ray (2.60: "Tried to complete task
    that was not pending"), so a connection of our own is shut down instead, and the cluster then
    stops the driver's tasks itself."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)


def _result(ray, ref, job: pipeline.Job) -> tuple[str, object]:
    """A task's answer; a task that failed for good (its worker died more than `MAX_RETRIES`
    times, say) raises `pipeline.WorkerLost` naming the tensor."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise pipeline.WorkerLost(f"the Ray task compressing {job.tensor!r} failed after {MAX_RETRIES} "
                                  f"retries: {first}") from None
