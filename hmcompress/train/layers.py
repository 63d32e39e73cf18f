"""Training with H-matrices: trainable H-matrix layers, dynamic recompression and a rank penalty.

A trainable `TrainableHLinear` holds the leaves of an H-matrix as parameters: the factors U (h x k) and
V (k x w) of every low-rank block, the values of every dense block (and the stored rows of every
rows block, the others staying zero). Leaves of one kind and shape are batched, so a forward pass
costs a few tensor operations per block shape, never one call per block.

`recompress` is the paper's "dynamic" step: each layer is rebuilt by `compress_matrix` from its
current dense equivalent (a new partition, new ranks), and the rebuilt layer's error is measured
against that equivalent, never left above its tolerance. `rank_penalty` is the differentiable
stand-in for the paper's λ Σ rank(H_ij): it drives small singular values to zero during training,
so that the next `recompress` finds blocks of lower rank. A recompressed layer has new parameters:
continue with `rebuild_optimizer` (module identities do not change).

Trainable factors are floating-point parameters in the source dtype: a packed matrix coded in
integers (``precision="auto"``) is decoded for training, and `TrainableHLinear.to_hmatrix` packs the trained
layer in that floating dtype. The inference layer is `hmcompress.runtime.HLinear`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.core.codecs import source_codec
from hmcompress.core.packer import Packer
from hmcompress.runtime import DENSE, LOWRANK, ROWS, HMatrix, row_mask

PENALTIES = ("nuclear", "factor")
TIGHTENINGS = 4  # rebuilds with a tighter tolerance before `recompress` keeps a layer as it is


class _Leaves(nn.Module):
    """Leaves of one kind and one shape (h x w): where they lie, and products with their columns.

    Subclasses hold the parameters and define ``values(dtype)`` (count, h, w) and ``multiply``.
    """

    def __init__(self, corners: Sequence[tuple[int, int, int]], h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w
        row0, col0, level = (torch.tensor(column, dtype=torch.int64) for column in zip(*corners))
        self.register_buffer("row_index", (row0[:, None] + torch.arange(h)).reshape(-1), persistent=False)
        self.register_buffer("col_index", (col0[:, None] + torch.arange(w)).reshape(-1), persistent=False)
        self.register_buffer("level", level, persistent=False)

    @property
    def count(self) -> int:
        return int(self.level.shape[0])

    def corners(self) -> list[tuple[int, int, int]]:
        """(row0, col0, level) of every leaf."""
        return list(zip(self.row_index[::self.h].tolist(), self.col_index[::self.w].tolist(),
                        self.level.tolist()))

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """(N, count * h): every leaf times its columns of x (N, n), for `index_add` at ``row_index``."""
        columns = x.index_select(1, self.col_index).view(x.shape[0], self.count, self.w).transpose(0, 1)
        return self.multiply(columns).transpose(0, 1).reshape(x.shape[0], -1)

    def flat_index(self, n: int) -> torch.Tensor:
        """Position of every leaf element in the flattened m x n matrix (order of `values`)."""
        rows = self.row_index.view(self.count, self.h, 1)
        return (rows * n + self.col_index.view(self.count, 1, self.w)).reshape(-1)

    def nuclear(self) -> torch.Tensor:
        """Σ of the leaves' nuclear norms (gradient U_s V_sᵀ of each leaf's SVD)."""
        return torch.linalg.svdvals(self.values()).sum()


class _LowRankLeaves(_Leaves):
    """Low-rank leaves U V, ranks padded to the largest; ``rank_mask`` keeps the padding at zero."""

    def __init__(self, corners, h: int, w: int, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype) -> None:
        super().__init__(corners, h, w)
        rank = max(u.shape[1] for u, _ in factors)
        u = torch.zeros(len(factors), h, rank, dtype=torch.float64)
        v = torch.zeros(len(factors), rank, w, dtype=torch.float64)
        mask = torch.zeros(len(factors), rank, dtype=torch.float64)
        for j, (uj, vj) in enumerate(factors):
            k = uj.shape[1]
            u[j, :, :k], v[j, :k], mask[j, :k] = uj, vj, 1.0
        self.u = nn.Parameter(u.to(dtype))
        self.v = nn.Parameter(v.to(dtype))
        self.register_buffer("rank_mask", mask.to(dtype), persistent=False)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u, v, mask = (t if dtype is None else t.to(dtype) for t in (self.u, self.v, self.rank_mask))
        return u * mask.unsqueeze(1), v * mask.unsqueeze(2)

    def multiply(self, columns: torch.Tensor) -> torch.Tensor:
        u, v = self.factors()
        return torch.bmm(torch.bmm(columns, v.mT), u.mT)

    def values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        u, v = self.factors(dtype)
        return torch.bmm(u, v)

    def nuclear(self) -> torch.Tensor:
        """Σ ‖U V‖_* without forming U V: with orthonormal bases Q_u ⊇ col(U) and Q_v ⊇ row(V),
        ‖U V‖_* = ‖(Q_uᵀ U)(V Q_v)‖_*, a rank x rank core. The bases come from QR outside autograd
        (QR's backward breaks on the zero padding columns), yet the gradient is the exact one:
        U_s V_sᵀ of U V lies in those spaces, so holding them fixed changes no first-order term."""
        u, v = self.factors()
        if u.shape[2] >= min(self.h, self.w):
            return super().nuclear()  # the core would be no smaller than the leaf
        with torch.no_grad():
            q_u = torch.linalg.qr(u).Q  # (count, h, rank)
            q_v = torch.linalg.qr(v.mT).Q  # (count, w, rank)
        return torch.linalg.svdvals((q_u.mT @ u) @ (v @ q_v)).sum()

    def factor_norm(self) -> torch.Tensor:
        """Σ (‖U‖_F² + ‖V‖_F²) / 2, which is ≥ Σ ‖U V‖_* (equal for balanced factors)."""
        u, v = self.factors()
        return (u.square().sum() + v.square().sum()) / 2

    @property
    def stored_numbers(self) -> int:
        return int(self.rank_mask.sum()) * (self.h + self.w)

    def segments(self) -> Iterable[tuple[list[int], int, list[torch.Tensor]]]:
        """Per leaf: its block table row, segment kind and stored rows (A = Uᵀ, B = V)."""
        u, v = (t.detach().cpu() for t in self.factors())
        for j, (row0, col0, level) in enumerate(self.corners()):
            k = int(self.rank_mask[j].sum())
            yield [row0, col0, self.h, self.w, level], LOWRANK, [u[j, :, :k].T, v[j, :k]] if k else []


class _DenseLeaves(_Leaves):
    """Dense leaves; a rows leaf is a dense one whose unstored rows ``row_mask`` keeps at zero."""

    def __init__(self, corners, h: int, w: int, blocks: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                 dtype: torch.dtype) -> None:
        super().__init__(corners, h, w)
        self.weight = nn.Parameter(torch.stack([b for b, _ in blocks]).to(dtype))
        mask = torch.stack([torch.ones(h) if rows is None else rows for _, rows in blocks])
        self.register_buffer("row_mask", mask.to(dtype), persistent=False)
        self.register_buffer("is_rows", torch.tensor([rows is not None for _, rows in blocks]), persistent=False)

    def values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight, mask = (t if dtype is None else t.to(dtype) for t in (self.weight, self.row_mask))
        return weight * mask.unsqueeze(2)

    def multiply(self, columns: torch.Tensor) -> torch.Tensor:
        return torch.bmm(columns, self.values().mT)

    def factor_norm(self) -> torch.Tensor:
        """A dense leaf has no factors: the surrogate's minimum over all factorizations, ‖D‖_*."""
        return self.nuclear()

    @property
    def stored_numbers(self) -> int:
        return int(self.row_mask.sum()) * self.w

    def segments(self) -> Iterable[tuple[list[int], int, list[torch.Tensor]]]:
        """Per leaf: its block table row, segment kind and stored rows (rows: and their numbers)."""
        values = self.values().detach().cpu()
        for j, (row0, col0, level) in enumerate(self.corners()):
            block = [row0, col0, self.h, self.w, level]
            if bool(self.is_rows[j]):
                keep = torch.nonzero(self.row_mask[j].cpu()).reshape(-1)
                yield block, ROWS, [values[j, keep], keep]
            else:
                yield block, DENSE, [values[j]]


@dataclasses.dataclass
class Recompressed:
    """What `recompress` (or the swap of an `nn.Linear`) did to one layer. ``error``: ‖W − H‖_F in
    float64, W the dense weight before (the layer's dense equivalent, or the `nn.Linear` weight)."""

    name: str
    shape: tuple[int, int]
    tol: float
    norm: float  # ‖W‖_F
    budget: float  # allowed ‖W − H‖_F: tol · ‖W‖_F, or tol if the tolerance is absolute
    error: float
    numbers_before: int
    numbers_after: int
    blocks_after: int
    rebuilt: bool  # False: no rebuild met the budget (possible only at tol ~ rounding), layer kept

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


class TrainableHLinear(nn.Module):
    """``y = x @ Hᵀ + bias`` with H an H-matrix whose leaves are trainable parameters.

    Build it with `from_linear` or `from_matrix` (compressing within the tolerance) or from a
    packed `HMatrix` (e.g. read from a compressed file). Parameters are in the source dtype;
    factors stored in integer codecs are decoded, not kept as codes. Gradients are those of
    ``x @ to_dense()ᵀ + bias`` (up to rounding: the product never forms H). ``.to()``,
    ``.double()`` and the like convert the parameters as for any module.
    """

    def __init__(self, hmatrix: HMatrix, bias: torch.Tensor | None = None,
                 options: CompressionOptions = CompressionOptions(precision="keep"),
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        dtype = dtype or hmatrix.dtype
        self.out_features, self.in_features = hmatrix.shape
        self.options = options
        self.leaves = _leaf_groups(hmatrix, dtype).to(device)
        self.empty = _empty_blocks(hmatrix)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
        self.bias = bias
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tol: float = 1e-2, precision: str = "keep", *,
                    leaf: int = 32, strategy: str = "optimal", absolute: bool = False) -> "TrainableHLinear":
        """An H-matrix layer within ``tol`` of ``linear`` (relative Frobenius unless ``absolute``),
        in ``linear``'s dtype and device. ``precision="auto"`` lets the partition and ranks be
        chosen for integer codecs, but trainable factors are not kept in integer codecs."""
        options = CompressionOptions(tol=tol, absolute=absolute, strategy=strategy, precision=precision, leaf=leaf)
        return cls.from_matrix(linear.weight, linear.bias, options)

    @classmethod
    def from_matrix(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                    options: CompressionOptions) -> "TrainableHLinear":
        """An H-matrix layer within ``options`` of ``weight`` (measured), with ``bias``."""
        weight = weight.detach()
        exact = dataclasses.replace(options, tol=0.0)  # ``weight`` itself: always within budget
        for trial in (options, exact):
            layer = _fit(weight.double(), weight.dtype, trial, weight.device, bias)
            if layer is not None:
                layer.options = options
                return layer
        raise AssertionError("unreachable: the exact matrix is within any budget")

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def stored_numbers(self) -> int:
        """Numbers the leaves store: r·(h + w) per low-rank leaf, h·w per dense one (stored rows·w)."""
        return sum(group.stored_numbers for group in self.leaves)

    @property
    def dense_numbers(self) -> int:
        return self.out_features * self.in_features

    @property
    def block_count(self) -> int:
        return sum(group.count for group in self.leaves) + len(self.empty)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TrainableHLinear expects inputs with {self.in_features} features, got {tuple(x.shape)}")
        rows = x.reshape(math.prod(x.shape[:-1]), self.in_features)
        rows = rows if rows.dtype == self.dtype else rows.to(self.dtype)
        y = rows.new_zeros(rows.shape[0], self.out_features)
        for group in self.leaves:
            y = y.index_add(1, group.row_index, group.contribution(rows))
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight H (out x in), differentiable in the parameters; computed in ``dtype`` if given
        (float64 gives the exact dense equivalent of the parameters)."""
        flat = self._anchor.new_zeros(self.dense_numbers, dtype=dtype or self.dtype)
        for group in self.leaves:
            flat = flat.index_add(0, group.flat_index(self.in_features), group.values(flat.dtype).reshape(-1))
        return flat.view(self.out_features, self.in_features)

    def to_hmatrix(self) -> HMatrix:
        """The layer as a packed `HMatrix` in its parameter dtype (exactly its parameters), ready
        for `hmcompress.io.writer.write_compressed` and the runtime."""
        leaves = [leaf for group in self.leaves for leaf in group.segments()]
        leaves += [(list(block), LOWRANK, []) for block in self.empty]
        codec = source_codec(self.dtype)
        packer = Packer()
        leaves.sort(key=lambda leaf: leaf[0][:2])  # row-major order of position, as `build.assemble`
        for index, (block, kind, parts) in enumerate(leaves):
            if kind == ROWS:
                values, keep = parts
                packer.add(index, ROWS, codec, len(keep), [values])
                packer.row_masks.append(row_mask(keep, block[2]))
            elif kind == DENSE:
                packer.add(index, DENSE, codec, 0, parts)
            elif parts:  # a low-rank leaf of rank 0 is a zero block: no segment
                packer.add(index, LOWRANK, codec, parts[0].shape[0], parts)
        return packer.finish((self.out_features, self.in_features), self.dtype, [b for b, _, _ in leaves])

    def rank_penalty(self, kind: str = "nuclear") -> torch.Tensor:
        """Σ over this layer's leaves of ‖leaf‖_* (``"nuclear"``) or of the factor surrogate
        (‖U‖_F² + ‖V‖_F²)/2 (``"factor"``; a dense leaf counts its nuclear norm, the surrogate's
        minimum). Both are convex stand-ins for the leaf's rank that gradient descent can lower."""
        if kind not in PENALTIES:
            raise ValueError(f"kind must be one of {', '.join(PENALTIES)}, got {kind!r}")
        terms = [group.nuclear() if kind == "nuclear" else group.factor_norm() for group in self.leaves]
        return torch.stack(terms).sum() if terms else self._anchor.new_zeros(())

    @torch.no_grad()
    def recompress(self, options: CompressionOptions | None = None, name: str = "") -> Recompressed:
        """Rebuild the leaves from the current dense equivalent (new partition and ranks) within
        ``options`` (default: the layer's own); the bias stays the same parameter.

        The rebuilt layer is measured in float64 against the dense equivalent before; if even a
        tighter rebuild misses the budget (only at a tolerance near rounding), the layer is kept
        unchanged (error 0).
        """
        options = options or self.options
        before, numbers = self.to_dense(torch.float64), self.stored_numbers
        norm = float(torch.linalg.matrix_norm(before))
        rebuilt = _fit(before, self.dtype, options, before.device, None)
        error = 0.0
        if rebuilt is not None:
            error = float(torch.linalg.matrix_norm(before - rebuilt.to_dense(torch.float64)))
            self.leaves, self.empty = rebuilt.leaves, rebuilt.empty
        self.options = options
        return Recompressed(name, (self.out_features, self.in_features), options.tol, norm,
                            math.sqrt(options.budget(norm)), error, numbers, self.stored_numbers,
                            self.block_count, rebuilt is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.block_count}, "
                f"stored={self.stored_numbers}/{self.dense_numbers}, bias={self.bias is not None}, "
                f"tol={self.options.tol:g}")


def _leaf_groups(hm: HMatrix, dtype: torch.dtype) -> nn.ModuleList:
    """The leaves of ``hm`` as trainable groups, one per kind and shape (sorted: deterministic)."""
    blocks = hm.blocks.tolist()
    segments: dict[int, list] = {}
    for block, segment in zip(hm.segments[:, 0].tolist(), hm.segment_values()):
        segments.setdefault(block, []).append(segment)
    lowrank: dict[tuple[int, int], list] = {}
    dense: dict[tuple[int, int], list] = {}
    for block, parts in sorted(segments.items()):
        row0, col0, h, w, level = blocks[block]
        corner = (row0, col0, level)
        if parts[0].kind == LOWRANK:
            u = torch.cat([s.a for s in parts]).T
            v = torch.cat([s.b for s in parts])
            lowrank.setdefault((h, w), []).append((corner, (u, v)))
        elif parts[0].kind == DENSE:
            dense.setdefault((h, w), []).append((corner, (parts[0].block, None)))
        else:
            values, stored = torch.zeros(h, w, dtype=torch.float64), torch.zeros(h)
            for s in parts:
                values[s.index], stored[s.index] = s.values, 1.0
            dense.setdefault((h, w), []).append((corner, (values, stored)))
    groups = [_LowRankLeaves([c for c, _ in items], h, w, [f for _, f in items], dtype)
              for (h, w), items in sorted(lowrank.items())]
    groups += [_DenseLeaves([c for c, _ in items], h, w, [b for _, b in items], dtype)
               for (h, w), items in sorted(dense.items())]
    return nn.ModuleList(groups)


def _empty_blocks(hm: HMatrix) -> list[tuple[int, int, int, int, int]]:
    """(row0, col0, rows, cols, level) of the blocks without segments (zero blocks)."""
    used = set(hm.segments[:, 0].tolist())
    return [tuple(b) for i, b in enumerate(hm.blocks.tolist()) if i not in used]


def _fit(reference: torch.Tensor, dtype: torch.dtype, options: CompressionOptions,
         device: torch.device | str | None, bias: torch.Tensor | None) -> TrainableHLinear | None:
    """A layer of ``dtype`` whose float64 error against ``reference`` is within the budget, or None.

    `compress_matrix` guarantees its packed matrix; a layer's parameters hold that matrix's
    factors rounded to ``dtype`` (exact for ``precision="keep"``, not always for integer codecs),
    so the layer itself is measured and rebuilt tighter while it misses.
    """
    allowed = math.sqrt(options.budget(float(torch.linalg.matrix_norm(reference))))
    source = reference.detach().to(dtype).cpu()
    trial = options
    for _ in range(TIGHTENINGS):
        layer = TrainableHLinear(compress_matrix(source, trial, planned_only=True).hmatrix, bias, options, dtype,
                                 device)
        with torch.no_grad():
            error = float(torch.linalg.matrix_norm(reference - layer.to_dense(torch.float64)))
        if error <= allowed:
            return layer
        if trial.tol == 0:
            return None
        trial = dataclasses.replace(trial, tol=trial.tol * min(0.5, 0.95 * allowed / error))
    return None


# ------------------------------------------------------------------------------------------------
# Whole models


def hlinear_layers(model: nn.Module) -> list[tuple[str, TrainableHLinear]]:
    """Every trainable `TrainableHLinear` of ``model`` with its module name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, TrainableHLinear)]


def replace_linears(model: nn.Module, tol: float = 1e-2, *, include: Sequence[str] = ("*",),
                    exclude: Sequence[str] = (), precision: str = "keep", leaf: int = 32,
                    strategy: str = "optimal", absolute: bool = False) -> list[Recompressed]:
    """Replace, in place, every `nn.Linear` whose module name matches a glob of ``include`` and
    none of ``exclude`` by an `TrainableHLinear` within ``tol``; returns what was done to each (the errors
    measured against the original weight). Build the optimizer after this call."""
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not _selected(name, include, exclude):
            continue
        if not name:
            raise ValueError("cannot replace the model itself by a TrainableHLinear; pass a module containing it")
        layer = TrainableHLinear.from_linear(module, tol, precision, leaf=leaf, strategy=strategy, absolute=absolute)
        weight = module.weight.detach().double()
        norm = float(torch.linalg.matrix_norm(weight))
        with torch.no_grad():
            error = float(torch.linalg.matrix_norm(weight - layer.to_dense(torch.float64)))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        done.append(Recompressed(name, (layer.out_features, layer.in_features), tol, norm,
                                 math.sqrt(layer.options.budget(norm)), error, layer.dense_numbers,
                                 layer.stored_numbers, layer.block_count, True))
    return done


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


def recompress(model: nn.Module, tol: float | None = None) -> list[Recompressed]:
    """Rebuild every `TrainableHLinear` of ``model`` from its current dense equivalent (the dynamic step),
    at ``tol`` (default: each layer's own tolerance; other options are the layer's). No layer's
    error exceeds its budget (see `TrainableHLinear.recompress`). Parameters change: continue with
    ``optimizer = rebuild_optimizer(optimizer, model)``."""
    results = []
    for name, layer in hlinear_layers(model):
        options = None if tol is None else dataclasses.replace(layer.options, tol=tol)
        results.append(layer.recompress(options, name))
    return results


def rank_penalty(model: nn.Module, kind: str = "nuclear") -> torch.Tensor:
    """Σ over every `TrainableHLinear` of `TrainableHLinear.rank_penalty`; add ``λ * rank_penalty(model)`` to the loss."""
    if kind not in PENALTIES:
        raise ValueError(f"kind must be one of {', '.join(PENALTIES)}, got {kind!r}")
    terms = [layer.rank_penalty(kind) for _, layer in hlinear_layers(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@dataclasses.dataclass
class Footprint:
    """Storage of a model's `TrainableHLinear` weights beside the dense weights they stand for."""

    layers: int
    stored_numbers: int
    dense_numbers: int
    stored_bytes: int  # bytes of the packed matrices (tables included), as a compressed file holds them
    dense_bytes: int

    @property
    def stored_fraction(self) -> float:
        """Stored numbers / dense numbers (1 = no saving)."""
        return self.stored_numbers / self.dense_numbers if self.dense_numbers else 1.0

    @property
    def bytes_ratio(self) -> float:
        """Dense bytes / stored bytes (the report's "ratio": larger is smaller)."""
        return self.dense_bytes / self.stored_bytes if self.stored_bytes else 1.0


def footprint(model: nn.Module) -> Footprint:
    """What the `TrainableHLinear` weights of ``model`` store, in numbers and in packed bytes."""
    layers = [layer for _, layer in hlinear_layers(model)]
    itemsize = [torch.empty((), dtype=layer.dtype).element_size() for layer in layers]
    return Footprint(len(layers), sum(layer.stored_numbers for layer in layers),
                     sum(layer.dense_numbers for layer in layers),
                     sum(layer.to_hmatrix().nbytes for layer in layers),
                     sum(layer.dense_numbers * size for layer, size in zip(layers, itemsize)))


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class over ``model``'s trainable parameters, after `recompress`.

    Each parameter group keeps its current hyperparameters (a scheduler's learning rate
    included) and the parameters still in the model keep their state (biases, layers that are
    not H-matrices); the new parameters join the first group that lost some, with fresh state.
    L-BFGS starts afresh (its history belongs to the old parameters). A learning-rate scheduler
    must be re-attached to the returned optimizer.
    """
    present = {id(p) for p in model.parameters() if p.requires_grad}
    groups, target, kept = [], None, set()
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if id(p) in present]
        if target is None and len(params) < len(group["params"]):
            target = len(groups)
        kept.update(id(p) for p in params)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    fresh = [p for p in model.parameters() if p.requires_grad and id(p) not in kept]
    groups[target or 0]["params"] = groups[target or 0]["params"] + fresh
    rebuilt = type(optimizer)([g for g in groups if g["params"]], **optimizer.defaults)
    if not isinstance(optimizer, torch.optim.LBFGS):
        for group in groups:
            for p in group["params"]:
                if p in optimizer.state:
                    rebuilt.state[p] = optimizer.state[p]
    return rebuilt


_RENAMED = {"HLinear": TrainableHLinear, "to_hmatrix": replace_linears}  # names before version 0.2


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        warnings.warn(f"hmcompress.train.layers.{name} is now {_RENAMED[name].__name__}; the old name goes in "
                      "the next release", DeprecationWarning, stacklevel=2)
        return _RENAMED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
