"""The library's verbs: compress a checkpoint, verify a compressed file, inspect a checkpoint.

The CLI only wires options to these functions; everything a user sees comes from their results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
import warnings
from collections.abc import Callable

import torch

from hmcompress.core.build import CompressionOptions, as_matrix
from hmcompress.core.stats import LayerStats, totals
from hmcompress.core.verdicts import Gates, recorded_fields, recorded_problems
from hmcompress.core.weighted import activation_energy
from hmcompress.errors import OutputExists, UserError
from hmcompress.io import pipeline, training
from hmcompress.io.activations import ActivationStats
from hmcompress.io.checkpoint import Checkpoint, Selection, classify, open_checkpoint
from hmcompress.io.writer import (
    SHIM_NAME,
    StreamedTensor,
    shard_paths,
    write_assembled,
    write_runtime_shim,
    write_streamed,
)
from hmcompress.runtime import FORMAT_VERSION, read_file


@dataclasses.dataclass(frozen=True)
class ProgressReport:
    """Where a compression stands: matrices and their source bytes done of the total (from the
    start), and the matrix that just finished (None before the first)."""

    done: int
    total: int
    done_bytes: int
    total_bytes: int
    finished: str | None


Progress = Callable[[ProgressReport], None]
ENGINES = ("local", "ray")  # where the matrices are compressed: worker processes here, or Ray tasks


@dataclasses.dataclass
class CompressionResult:
    source: pathlib.Path
    output: pathlib.Path | None
    layers: list[LayerStats]
    options: dict
    failures: list[str] = dataclasses.field(default_factory=list)  # quality gates missed
    reused: list[str] = dataclasses.field(default_factory=list)  # results resumed from an earlier run
    kept: training.Keep | None = None  # tensors left out or renamed (training checkpoints)
    extra: list[str] = dataclasses.field(default_factory=list)  # non-tensor entries kept in the header
    not_stored: list[str] = dataclasses.field(default_factory=list)  # non-tensor entries JSON cannot hold
    dropped_bytes: int = 0  # bytes of the tensors left out (not in the totals)
    seconds: float = 0.0  # wall time of the whole compression (reading, compressing, writing)
    matrix_bytes: int = 0  # source bytes of the matrices to compress

    def throughput(self) -> dict:
        """Source bytes of the matrices compressed per second of wall time (MB = 10^6 bytes), as the
        progress line shows it."""
        rate = self.matrix_bytes / self.seconds / 1e6 if self.seconds > 0 else None
        return {"seconds": round(self.seconds, 3), "matrix_bytes": self.matrix_bytes,
                "mb_per_s": round(rate, 3) if rate is not None else None}

    def totals(self) -> dict:
        return totals(self.layers)

    def to_json(self) -> dict:
        """One input's entry in ``compress --json``."""
        return {"ok": not self.failures, "source": str(self.source),
                "output": str(self.output) if self.output else None, "gate_failures": self.failures,
                "options": self.options, "layers": [s.to_json() for s in self.layers], "totals": self.totals(),
                "dropped": dict(sorted(self.kept.dropped.items())) if self.kept else {},
                "removed_prefix": self.kept.prefix if self.kept else "", "dropped_bytes": self.dropped_bytes,
                "extra": self.extra, "not_stored": self.not_stored, "throughput": self.throughput()}

    def notes(self) -> list[str]:
        """What happened to everything that is not a compressed or passthrough tensor, for people."""
        lines = []
        if self.kept and self.kept.dropped:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.kept.summary()["dropped"].items())
            lines.append(f"dropped: {counts}; {self.dropped_bytes} bytes, not counted in the ratio")
        if self.kept and self.kept.prefix:
            lines.append(f"renamed: {self.kept.prefix!r} removed from the start of {len(self.kept.names)} names")
        if self.extra:
            lines.append(f"kept in the file's header (\"extra\"): {', '.join(self.extra)}")
        if self.not_stored:
            lines.append(f"not stored (not tensors, not JSON): {', '.join(self.not_stored)}")
        return lines


def default_output(source: pathlib.Path, out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """``<stem>.hm.safetensors`` beside the input (or in ``out_dir``)."""
    name = source.name
    for suffix in (".safetensors", ".pth.tar", ".pt", ".pth", ".bin", ".ckpt", ".npz", ".jit"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return (out_dir or source.parent) / f"{name}.hm.safetensors"


def compress_checkpoint(source: str | pathlib.Path, output: str | pathlib.Path | None,
                        options: CompressionOptions, selection: Selection = Selection(),
                        overwrite: bool = False, progress: Progress | None = None,
                        write: bool = True, gates: Gates | None = None,
                        keep_failed: bool = False, workers: int | None = None, resume: bool = False,
                        engine: str = "local", address: str | None = None,
                        max_shard_bytes: int | None = None, activations: str | pathlib.Path | None = None,
                        tols: dict[str, float] | None = None, recorded_extra: dict | None = None,
                        output_grams: str | pathlib.Path | None = None) -> CompressionResult:
    """Compress every eligible matrix of a checkpoint and write the compressed file + shim.

    Tensors are compressed one at a time (in ``workers`` processes; by default as many as the
    work justifies, see `pipeline.default_workers`) and the output is streamed,
    so memory stays within a small multiple of the largest tensor (see `pipeline`). With
    ``resume``, results an interrupted run left in the work directory are reused. With ``gates``,
    a result that misses one is not written (unless ``keep_failed``); its ``failures`` say why
    and its ``output`` is None. ``engine="ray"`` compresses the matrices as Ray tasks (on the
    cluster at ``address``, or a local one); the file is the same. With ``max_shard_bytes``, a
    larger output is written as shards and an index (`writer.write_sharded`), whose path
    ``output`` then is. With ``activations`` (a stats file of `hmcompress calibrate`), every
    matrix it has G for is built for the error of what it computes on those inputs
    (`core.weighted`); the others keep the plain bound. ``tols`` gives some matrices their own
    tolerance (by output name; what `--model-tol` chose), and ``recorded_extra`` goes into the
    header's options beside them. ``output_grams``: a safetensors file by output name
    (`evaluate.output_grams`; `--model-tol` writes it) of K for data-aware matrices and of a metric
    on the columns for the others: their rows are rounded for the model's output
    (`core.build.InputsBuilder`, `compress_matrix`), their guarantees unchanged.
    """
    started = time.monotonic()
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    source = pathlib.Path(source)
    opened = open_checkpoint(source)
    output = pathlib.Path(output) if output else default_output(source)
    if write:
        check_output(output, overwrite, source, activations, beside_shim=True)
        if max_shard_bytes is not None:
            check_output(shard_paths(output, 1)[1], overwrite, source, activations, beside_shim=True)
    kept, ckpt, reasons = selected(opened, selection, source)
    source_names = {new: old for old, new in kept.names.items()}
    eligible = [e.name for e in ckpt.entries if reasons[e.name] is None]
    slots = {name: slot for slot, name in enumerate(eligible)}
    weighted = _weighted_names(activations, ckpt, eligible, source)
    unknown = sorted(set(tols or {}) - set(eligible))
    if unknown:
        raise UserError(f"{source}: a tolerance was given for {unknown[0]!r}, which is no compressible matrix of it")
    workdir = pipeline.WorkDir.beside(output) if write else None  # a run that writes nothing keeps no results
    with contextlib.ExitStack() as stack:
        if workdir is not None:
            workdir.prepare(resume)
            stack.push(_discard_on_failure(workdir, output, keep=resume))
        jobs = [pipeline.Job(str(source), name, source_names[name], slots[name],
                             dataclasses.replace(options, tol=tols[name]) if name in (tols or {}) else options,
                             selection.passthrough_nonfinite, workdir and str(workdir.path), resume and write,
                             str(activations) if name in weighted else None,
                             None if output_grams is None else str(output_grams))
                for name in eligible]
        pipeline.use_checkpoint(str(source), opened)
        sizes = {e.name: e.nbytes for e in ckpt.entries if reasons[e.name] is None}
        if workers is None:
            workers = pipeline.default_workers(sum(sizes.values()))
        counter = _byte_counter(progress, sizes)
        if engine == "ray":
            from hmcompress.io import ray_engine

            ran = ray_engine.run_jobs(jobs, address, counter)
        else:
            ran = pipeline.run_jobs(jobs, workers, counter)
        outcomes = {o.name: o for o in ran}
        layers = []
        for entry in ckpt.entries:
            outcome = outcomes.get(entry.name)
            if outcome is not None and outcome.stats is not None:
                layers.append(LayerStats(**recorded_fields(LayerStats, outcome.stats, f"{source}: {entry.name}")))
                continue
            reason = reasons[entry.name] or outcome.reason
            reasons[entry.name] = reason
            layers.append(LayerStats(entry.name, list(entry.shape), str(entry.dtype).removeprefix("torch."),
                                     entry.nbytes, entry.nbytes, False, reason))
        # A file name that is not UTF-8 (bytes the system allows) is kept readable, never as lone
        # surrogates, which no JSON reader accepts.
        origin = {"file": source.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
                  "kind": ckpt.kind}
        if kept.dropped or kept.prefix:
            origin |= kept.summary()
        recorded = options_json(options, selection)
        if activations is not None:
            recorded["activations"] = {"file": pathlib.Path(activations).name, "matrices": len(weighted)}
        recorded |= recorded_extra or {}
        header = {"options": recorded, "source": origin, "extra": ckpt.extra}
        _warn_if_zeroed(layers, options)
        failures = gates.failures(layers, totals(layers)) if gates else []
        write = write and (keep_failed or not failures)
        if write:
            table, tensors = pipeline.assembled_tensors(ckpt, outcomes, workdir, slots)
            passthrough = {name: reason for name, reason in reasons.items() if name not in table}
            output = write_assembled(output, table, passthrough, tensors, header, overwrite=overwrite,
                                     max_shard_bytes=max_shard_bytes)
            write_runtime_shim(output.parent)
        if workdir is not None:
            workdir.remove()
    reused = sorted(o.name for o in outcomes.values() if o.reused)
    return CompressionResult(source, output if write else None, layers, header["options"], failures, reused,
                             kept, sorted(ckpt.extra), ckpt.dropped,
                             sum(e.nbytes for e in opened.entries if e.name in kept.dropped),
                             seconds=time.monotonic() - started, matrix_bytes=sum(sizes.values()))


def selected(opened: Checkpoint, selection: Selection,
             source: object) -> tuple[training.Keep, Checkpoint, dict[str, str | None]]:
    """What a run keeps of a checkpoint: the kept tensors under their output names, and why each
    is not compressed (None: it is)."""
    kept = training.keep(opened.entries, selection.drop_optimizer, selection.model_only, source)
    ckpt = dataclasses.replace(opened, entries=[dataclasses.replace(e, name=kept.names[e.name])
                                                for e in opened.entries if e.name in kept.names])
    return kept, ckpt, {e.name: classify(e, selection) for e in ckpt.entries}


def _weighted_names(activations: str | pathlib.Path | None, ckpt: Checkpoint, eligible: list[str],
                    source: pathlib.Path) -> set[str]:
    """The matrices to compress that a stats file has G for, after checking that it is for this
    checkpoint (every matrix of it counts there, compressed or not: the stats cover every layer
    the model ran)."""
    if activations is None:
        return set()
    stats = ActivationStats.open(activations)
    shapes = {e.name: tuple(as_matrix(torch.empty(e.shape, device="meta")).shape) for e in ckpt.entries
              if len(e.shape) >= 2}
    stats.check_against(shapes, source)
    weighted = set(stats.names) & set(eligible)
    for name in sorted(weighted):  # every G is checked before any work starts
        stats.gram(name)
    return weighted


def _warn_if_zeroed(layers: list[LayerStats], options: CompressionOptions) -> None:
    """A tolerance that lets a nonzero matrix be stored as zero is allowed, and said."""
    zeroed = [s.name for s in layers if s.compressed and not s.codecs and s.rel_error > 0]
    if zeroed:
        warnings.warn(f"{len(zeroed)} matrices ({', '.join(zeroed[:3])}{', ...' if len(zeroed) > 3 else ''}) are "
                      f"stored as zero: tol {options.tol:g}{' (absolute)' if options.absolute else ''} allows "
                      "dropping everything; a smaller tolerance keeps them", stacklevel=2)


def _byte_counter(progress: Progress | None, sizes: dict[str, int]):
    """The pipeline's (done, total, finished) callback, reporting bytes too."""
    if progress is None:
        return None
    state, total_bytes = {"bytes": 0}, sum(sizes.values())

    def count(done: int, total: int, finished: str | None) -> None:
        state["bytes"] += sizes[finished] if finished else 0
        progress(ProgressReport(done, total, state["bytes"], total_bytes, finished))
    return count


class Interrupted(KeyboardInterrupt):
    """A compression stopped by Ctrl-C (or SIGINT): its message says what was kept, and where."""

    def __init__(self, output: pathlib.Path, workdir: pathlib.Path, kept: int) -> None:
        matrices = "1 compressed matrix is" if kept == 1 else f"{kept} compressed matrices are"
        super().__init__(f"nothing written to {output}; {matrices} kept in {workdir}: run the same command "
                         "with --resume to go on")
        self.output, self.workdir, self.kept = output, workdir, kept


def _discard_on_failure(workdir: "pipeline.WorkDir", output: pathlib.Path, keep: bool):
    """An exit callback: a run that fails (bad input, or anything else) leaves nothing behind; with
    ``keep`` (--resume) its finished results stay for the next run. An interrupted run keeps them
    and says where (`Interrupted`)."""
    def on_exit(exc_type, exc, _tb) -> bool:
        if exc_type is None:
            return False
        if issubclass(exc_type, KeyboardInterrupt):
            if isinstance(exc, Interrupted) or not workdir.path.is_dir():
                return False
            raise Interrupted(output, workdir.path, workdir.finished()) from None
        if not keep:
            workdir.remove()
        return False
    return on_exit


def options_json(options: CompressionOptions, selection: Selection) -> dict:
    return {**dataclasses.asdict(options), "min_size": selection.min_size,
            "include": list(selection.include), "exclude": list(selection.exclude),
            "conv": selection.conv, "passthrough_nonfinite": selection.passthrough_nonfinite,
            **({"drop_optimizer": True} if selection.drop_optimizer else {}),
            **({"model_only": True} if selection.model_only else {}),
            "format_version": FORMAT_VERSION}


def options_from_json(recorded: dict) -> tuple[CompressionOptions, Selection]:
    """The options and selection `options_json` recorded, to compress again on this machine: the
    device is left out (it said where the factorizations ran, and this machine may lack it)."""
    fields = {f.name for f in dataclasses.fields(CompressionOptions)} - {"device"}
    options = CompressionOptions(**{k: v for k, v in recorded.items() if k in fields})
    defaults = Selection()
    selection = Selection(min_size=recorded.get("min_size", defaults.min_size),
                          include=tuple(recorded.get("include", ())), exclude=tuple(recorded.get("exclude", ())),
                          conv=bool(recorded.get("conv", False)),
                          passthrough_nonfinite=bool(recorded.get("passthrough_nonfinite", False)),
                          drop_optimizer=recorded.get("drop_optimizer") is True,
                          model_only=recorded.get("model_only") is True)
    return options, selection


def check_output(output: pathlib.Path, overwrite: bool, *inputs: str | pathlib.Path | None,
                 beside_shim: bool = False) -> None:
    """Before any work: ``output`` replaces none of the ``inputs`` (a checkpoint, a stats file, a
    compressed file), is a file to write (not a directory; with ``beside_shim``, not the runtime
    shim written beside it) in a directory that exists, and replaces a file only with ``overwrite``."""
    for source in inputs:
        if source is not None and is_input(output, pathlib.Path(source)):
            raise UserError(f"{output}: refusing to overwrite the input file {source}")
    if output.is_dir():
        raise UserError(f"{output}: is a directory; name the file to write")
    if beside_shim and output.name == SHIM_NAME:
        raise UserError(f"{output}: {SHIM_NAME} is the runtime written beside the compressed file; name it otherwise")
    if output.exists() and not overwrite:
        raise OutputExists(output)
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: output directory does not exist")


def is_input(output: pathlib.Path, source: pathlib.Path) -> bool:
    """Whether writing ``output`` would replace ``source`` or a file inside a source directory."""
    if not output.exists() or not source.exists():
        return False
    if source.is_dir():
        return output.resolve().parent == source.resolve()
    return output.samefile(source)


def decompress(path: str | pathlib.Path, output: str | pathlib.Path, overwrite: bool = False) -> int:
    """Write the dense checkpoint of a compressed file; returns the number of tensors.

    Matrices are expanded one at a time while the output streams, so memory holds the compressed
    file and one dense matrix, not the dense checkpoint.
    """
    compressed = read_file(path)
    tensors = [StreamedTensor.of(name, tensor) for name, tensor in compressed.passthrough.items()]
    for name, hm in compressed.matrices.items():
        shape = tuple(compressed.metadata["matrices"][name]["orig_shape"])
        tensors.append(StreamedTensor(name, hm.dtype, shape, lambda name=name: compressed.dense(name)))
    write_streamed(output, tensors, None, overwrite=overwrite)
    return len(tensors)


def stats_from_file(path: str | pathlib.Path) -> tuple[dict, list[LayerStats]]:
    """The header and per-layer stats stored in a compressed file (no recomputation)."""
    compressed = read_file(path)
    meta = compressed.metadata
    layers = []
    for name, info in sorted(meta["matrices"].items()):
        layers.append(LayerStats(**recorded_fields(LayerStats, info.get("stats"), f"{path}: {name}")))
    for name, reason in sorted(meta["passthrough"].items()):
        tensor = compressed.passthrough[name]
        nbytes = tensor.numel() * tensor.element_size()
        layers.append(LayerStats(name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                 nbytes, nbytes, False, reason))
    layers.sort(key=lambda s: s.name)
    return meta, layers


@dataclasses.dataclass
class Verification:
    name: str
    recorded_error: float
    measured_error: float
    budget: float
    ok: bool
    problems: list[str] = dataclasses.field(default_factory=list)  # recorded figures that do not hold
    norm: float = 0.0  # ||W||_F, which a relative tolerance multiplies
    absolute: bool = False  # the file's tolerance is absolute
    # A matrix built for its calibration inputs (stats norm "activations"): its tolerance is on
    # ||(W - H)X||_F / sqrt(N); measured again only where verify is given the stats file.
    data_aware: bool = False
    act_measured: float | None = None  # sqrt(tr(E G Eᵀ)) as measured now (the larger form)
    act_norm: float | None = None  # sqrt(tr(W G Wᵀ))
    act_budget: float | None = None


def verify(path: str | pathlib.Path, original: str | pathlib.Path,
           activations: str | pathlib.Path | None = None) -> list[Verification]:
    """Re-measure every compressed matrix against the original checkpoint and re-check every
    figure its stats record (errors, budget, bytes, spectral error, sigma and kappa(H) bounds);
    with ``activations`` (the stats file it was built with) also the data-aware ones."""
    stats_file = ActivationStats.open(activations) if activations is not None else None
    compressed = read_file(path)
    options = compressed.metadata.get("options")
    absolute = isinstance(options, dict) and options.get("absolute") is True
    ckpt = open_checkpoint(original)
    by_name = {e.name: e for e in ckpt.entries}
    # A file written with --model-only names the matrices without the prefix it removed (its
    # header says which): the original full checkpoint holds them under prefix + name.
    source = compressed.metadata.get("source")
    prefix = source.get("removed_prefix") if isinstance(source, dict) else None
    if isinstance(prefix, str) and prefix:
        by_name = {e.name[len(prefix):]: e for e in ckpt.entries if e.name.startswith(prefix)} | by_name
    results = []
    for name, info in sorted(compressed.metadata["matrices"].items()):
        if name not in by_name:
            raise UserError(f"{original}: has no tensor {name!r} (is it the original of {path}?)")
        w = as_matrix(by_name[name].load()).double()
        hm = compressed.matrices[name]
        if tuple(w.shape) != tuple(hm.shape):
            raise UserError(f"{original}: tensor {name!r} has shape {tuple(w.shape)}, not {hm.shape}")
        compressed.check_expansion(name)
        stats = recorded_fields(LayerStats, info.get("stats"), f"{path}: {name}")
        data_aware = stats.get("norm") == "activations"
        gram = stats_file.gram(name) if data_aware and stats_file and name in stats_file.names else None
        measured, problems = recorded_problems(w, hm, stats, absolute, f"{path}: {name}", gram)
        check = Verification(name, stats["fro_error"], measured, stats["budget"], not problems, problems,
                             float(torch.linalg.vector_norm(w)), absolute, data_aware)
        if gram is not None:
            dense = hm.to_dense(torch.float64)
            check.act_measured = max(math.sqrt(max(activation_energy(w, gram, dense, rounded)[0], 0.0))
                                     for rounded in (None, hm.dtype))
            check.act_norm = math.sqrt(max(activation_energy(w, gram)[0], 0.0))
            check.act_budget = stats["act_budget"]
        results.append(check)
    if stats_file is not None and not any(c.act_measured is not None for c in results):
        raise UserError(f"{activations}: has G for none of the data-aware matrices of {path}")
    return results


def inspect(path: str | pathlib.Path, selection: Selection = Selection()) -> tuple[Checkpoint, list[dict]]:
    """Tensors of a checkpoint and whether each would be compressed."""
    ckpt = open_checkpoint(path)
    rows = []
    for entry in ckpt.entries:
        reason = classify(entry, selection)
        rows.append({"name": entry.name, "shape": list(entry.shape),
                     "dtype": str(entry.dtype).removeprefix("torch."), "bytes": entry.nbytes,
                     "compress": reason is None, "reason": reason or ""})
    return ckpt, rows
