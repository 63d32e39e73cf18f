"""The library's verbs: compress a checkpoint, verify a compressed file, inspect a checkpoint.

The CLI only wires options to these functions; everything a user sees comes from their results.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable

import torch

from .bounds import compute_bounds
from .build import CompressionOptions, compress_matrix
from .checkpoint import Checkpoint, Selection, as_matrix, classify, open_checkpoint
from .errors import UserError
from .runtime import DENSE, FORMAT_VERSION, LOWRANK, ROWS, HMatrix, dense_nbytes, read_file
from .verdicts import Gates, recorded_fields, recorded_problems
from .writer import remove_stale_temporaries, write_compressed, write_runtime_shim

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


@dataclasses.dataclass
class LayerStats:
    """What the report says about one tensor (compressed or passed through)."""

    name: str
    shape: list[int]
    dtype: str
    bytes_before: int
    bytes_after: int
    compressed: bool
    reason: str = ""  # why it passed through
    blocks_lowrank: int = 0  # low-rank leaves (zero blocks included)
    blocks_rows: int = 0  # leaves stored row by row, each row in its own precision
    blocks_dense: int = 0
    max_rank: int = 0
    mean_rank: float = 0.0
    codecs: dict[str, int] = dataclasses.field(default_factory=dict)  # codec -> bytes
    tol: float = 0.0  # the relative (or absolute) tolerance asked for
    budget: float = 0.0  # allowed ||W - H||_F
    fro_error: float = 0.0
    rel_error: float = 0.0
    spectral_error: float = 0.0
    spectral_method: str = ""
    sigma_max: float = 0.0
    sigma_min: float = 0.0
    kappa_w: float | None = None
    kappa_h_bound: float | None = None
    kappa_h_paper: float | None = None
    strategy: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["ratio"] = round(self.ratio, 6) if math.isfinite(self.ratio) else None
        return data


@dataclasses.dataclass
class CompressionResult:
    source: pathlib.Path
    output: pathlib.Path | None
    layers: list[LayerStats]
    options: dict
    failures: list[str] = dataclasses.field(default_factory=list)  # quality gates missed

    def totals(self) -> dict:
        return totals(self.layers)


def totals(layers: list[LayerStats]) -> dict:
    """Byte totals over the whole checkpoint and over the compressed matrices alone."""
    comp = [s for s in layers if s.compressed]
    before = sum(s.bytes_before for s in layers)
    after = sum(s.bytes_after for s in layers)
    c_before = sum(s.bytes_before for s in comp)
    c_after = sum(s.bytes_after for s in comp)
    return {
        "tensors": len(layers),
        "compressed": len(comp),
        "bytes_before": before,
        "bytes_after": after,
        "ratio": before / after if after else None,
        "matrix_bytes_before": c_before,
        "matrix_bytes_after": c_after,
        "matrix_ratio": c_before / c_after if c_after else None,
        "max_rel_error": max((s.rel_error for s in comp), default=0.0),
    }


def layer_stats(name: str, original: torch.Tensor, hm: HMatrix, stored: torch.Tensor, error: float,
                budget: float, sigma, options: CompressionOptions, strategy: str) -> LayerStats:
    """Measure a compressed matrix: structure, bytes, errors and bounds."""
    bounds = compute_bounds(as_matrix(original), stored, error, sigma)
    segments = hm.segments.tolist()
    dense_blocks = {s[0] for s in segments if s[1] == DENSE}
    rows_blocks = {s[0] for s in segments if s[1] == ROWS}
    lowrank_blocks = hm.blocks.shape[0] - len(dense_blocks) - len(rows_blocks)  # zero blocks too
    ranks: dict[int, int] = {}
    codec_bytes: dict[str, int] = {}
    for block, kind, _codec, rank, _off, _soff in segments:
        if kind == LOWRANK:
            ranks[block] = ranks.get(block, 0) + rank
    for codec, pool in hm.pools.items():
        codec_bytes[codec] = pool.numel() * pool.element_size()
        if codec in hm.scales:
            codec_bytes[codec] += hm.scales[codec].numel() * 4
    return LayerStats(
        name=name, shape=list(original.shape), dtype=str(original.dtype).removeprefix("torch."),
        bytes_before=dense_nbytes(tuple(original.shape), original.dtype), bytes_after=hm.nbytes,
        compressed=True, blocks_lowrank=lowrank_blocks, blocks_rows=len(rows_blocks),
        blocks_dense=len(dense_blocks), max_rank=max(ranks.values(), default=0),
        mean_rank=round(sum(ranks.values()) / max(lowrank_blocks, 1), 3),
        codecs=dict(sorted(codec_bytes.items())), tol=options.tol, budget=budget,
        fro_error=bounds.fro_error, rel_error=bounds.rel_fro_error,
        spectral_error=bounds.spectral_error, spectral_method=bounds.spectral_method,
        sigma_max=bounds.sigma_max, sigma_min=bounds.sigma_min, kappa_w=bounds.kappa_w,
        kappa_h_bound=bounds.kappa_h_bound, kappa_h_paper=bounds.kappa_h_paper, strategy=strategy,
    )


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
                        keep_failed: bool = False) -> CompressionResult:
    """Compress every eligible matrix of a checkpoint and write the compressed file + shim.

    With ``gates``, a result that misses one is not written (unless ``keep_failed``); its
    ``failures`` say why and its ``output`` is None.
    """
    source = pathlib.Path(source)
    ckpt = open_checkpoint(source)
    output = pathlib.Path(output) if output else default_output(source)
    if write:
        _check_output(source, output, overwrite)
    matrices, passthrough, layers = {}, {}, []
    eligible = sum(classify(e, selection) is None for e in ckpt.entries)
    for entry in ckpt.entries:
        reason = classify(entry, selection)
        tensor = entry.load()
        if reason is None and not bool(torch.isfinite(tensor).all()):
            reason = _nonfinite(source, entry.name, selection)
        if reason is not None:
            passthrough[entry.name] = (tensor, reason)
            layers.append(LayerStats(entry.name, list(entry.shape), str(entry.dtype).removeprefix("torch."),
                                     entry.nbytes, entry.nbytes, False, reason))
            continue
        if progress:
            progress(len(matrices), eligible, entry.name)
        result = compress_matrix(as_matrix(tensor), options)
        stats = layer_stats(entry.name, tensor, result.hmatrix, result.dense, result.error,
                            result.budget, result.root_sigma, options, result.strategy)
        matrices[entry.name] = (result.hmatrix, {"orig_shape": list(tensor.shape),
                                                 "stats": stats.to_json()})
        layers.append(stats)
    header = {"options": options_json(options, selection), "source": {"file": source.name, "kind": ckpt.kind},
              "extra": ckpt.extra}
    failures = gates.failures(layers, totals(layers)) if gates else []
    write = write and (keep_failed or not failures)
    if write:
        write_compressed(output, matrices, passthrough, header, overwrite=overwrite)
        write_runtime_shim(output.parent)
    return CompressionResult(source, output if write else None, layers, header["options"], failures)


def options_json(options: CompressionOptions, selection: Selection) -> dict:
    return {**dataclasses.asdict(options), "min_size": selection.min_size,
            "include": list(selection.include), "exclude": list(selection.exclude),
            "conv": selection.conv, "passthrough_nonfinite": selection.passthrough_nonfinite,
            "format_version": FORMAT_VERSION}


def _check_output(source: pathlib.Path, output: pathlib.Path, overwrite: bool) -> None:
    if is_input(output, source):
        raise UserError(f"{output}: refusing to overwrite the input checkpoint")
    if output.exists() and not overwrite:
        raise UserError(f"{output}: exists (use --force to overwrite)")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: output directory does not exist")
    remove_stale_temporaries(output)


def is_input(output: pathlib.Path, source: pathlib.Path) -> bool:
    """Whether writing ``output`` would replace ``source`` or a file inside a source directory."""
    if not output.exists() or not source.exists():
        return False
    if source.is_dir():
        return output.resolve().parent == source.resolve()
    return output.samefile(source)


def _nonfinite(source: pathlib.Path, name: str, selection: Selection) -> str:
    """The passthrough reason of a tensor holding NaN or Inf, if the selection allows one."""
    if not selection.passthrough_nonfinite:
        raise UserError(f"{source}: tensor {name!r} contains NaN or Inf values "
                        "(--passthrough-nonfinite copies such tensors unchanged)")
    return "non-finite values (NaN/Inf)"


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


def verify(path: str | pathlib.Path, original: str | pathlib.Path) -> list[Verification]:
    """Re-measure every compressed matrix against the original checkpoint and re-check every
    figure its stats record (errors, budget, bytes, spectral error, sigma and kappa(H) bounds)."""
    compressed = read_file(path)
    options = compressed.metadata.get("options")
    absolute = isinstance(options, dict) and options.get("absolute") is True
    ckpt = open_checkpoint(original)
    by_name = {e.name: e for e in ckpt.entries}
    results = []
    for name, info in sorted(compressed.metadata["matrices"].items()):
        if name not in by_name:
            raise UserError(f"{original}: has no tensor {name!r} (is it the original of {path}?)")
        w = as_matrix(by_name[name].load()).double()
        hm = compressed.matrices[name]
        if tuple(w.shape) != tuple(hm.shape):
            raise UserError(f"{original}: tensor {name!r} has shape {tuple(w.shape)}, not {hm.shape}")
        stats = recorded_fields(LayerStats, info.get("stats"), f"{path}: {name}")
        measured, problems = recorded_problems(w, hm, stats, absolute, f"{path}: {name}")
        results.append(Verification(name, stats["fro_error"], measured, stats["budget"], not problems, problems))
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
