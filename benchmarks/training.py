"""Trainable `hmcompress.train.layers.HLinear`: one training step (forward + backward) against dense
`nn.Linear` and against the same leaves multiplied one Python call per leaf.

Kernel matrices (as `benchmarks.runtime`) compressed to 1e-4 with `--precision keep`, batches of
16 and 256, float32: time(H) / time(dense) and time(H) / time(per-leaf loop), both measured in
this process, and the stored numbers over the dense count; the nuclear rank penalty with its
backward pass over the H step, and over the same penalty with every low-rank leaf formed densely.
Usage: python -m benchmarks.training [--quick]
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks import print_table, quick_requested
from benchmarks.runtime import kernel, paired_times
from hmcompress.core.build import CompressionOptions
from hmcompress.train.layers import TrainableHLinear, _Leaves

SHAPES = ((256, 256), (512, 512), (1024, 1024), (2048, 2048))
BATCHES = (16, 256)


def per_leaf_step(layer: TrainableHLinear) -> Callable[[torch.Tensor], None]:
    """A training step over the same leaves, one product per leaf (the layout `TrainableHLinear` avoids)."""
    leaves = []
    for group in layer.leaves:
        values = [p.detach().clone().requires_grad_(True) for p in
                  (group.factors() if hasattr(group, "u") else (group.values(),))]
        for j, (row0, col0, _level) in enumerate(group.corners()):
            leaves.append((row0, col0, group.h, group.w, [v[j] for v in values], values))
    params = {id(v): v for *_, values in leaves for v in values}

    def step(x: torch.Tensor) -> None:
        y = x.new_zeros(x.shape[0], layer.out_features)
        for row0, col0, h, w, factors, _ in leaves:
            product = x[:, col0:col0 + w]
            for factor in reversed(factors):
                product = product @ factor.T
            y = y.index_add(1, torch.arange(row0, row0 + h), product)
        y.square().sum().backward()
        for p in params.values():
            p.grad = None

    return step


def train_step(module: nn.Module) -> Callable[[torch.Tensor], None]:
    def step(x: torch.Tensor) -> None:
        module(x).square().sum().backward()
        module.zero_grad(set_to_none=True)

    return step


def penalty_step(layer: TrainableHLinear, dense_form: bool = False) -> Callable[[], None]:
    """The nuclear rank penalty and its backward pass; ``dense_form``: each low-rank leaf's norm
    from U V formed densely (the base class's way), the baseline for the rank x rank cores."""
    def step() -> None:
        penalty = (sum(_Leaves.nuclear(group) for group in layer.leaves) if dense_form
                   else layer.rank_penalty("nuclear"))
        penalty.backward()
        layer.zero_grad(set_to_none=True)

    return step


def rows(shapes: tuple[tuple[int, int], ...]) -> list[list[str]]:
    out = []
    for m, n in shapes:
        dense = nn.Linear(n, m)
        with torch.no_grad():
            dense.weight.copy_(kernel(m, n))
        layer = TrainableHLinear.from_matrix(dense.weight, dense.bias, CompressionOptions(tol=1e-4, precision="keep"))
        h_step, d_step, loop_step = train_step(layer), train_step(dense), per_leaf_step(layer)
        penalty, dense_penalty = paired_times(penalty_step(layer), penalty_step(layer, dense_form=True))
        for batch in BATCHES:
            x = torch.randn(batch, n)
            h_time, d_time = paired_times(lambda: h_step(x), lambda: d_step(x))
            h_again, loop_time = paired_times(lambda: h_step(x), lambda: loop_step(x))
            out.append([f"{m}x{n}", str(batch), f"{layer.block_count}", f"{layer.stored_numbers / layer.dense_numbers:.3f}",
                        f"{h_time / d_time:.2f}", f"{h_again / loop_time:.3f}", f"{penalty / h_time:.2f}",
                        f"{penalty / dense_penalty:.3f}"])
    return out


def main() -> None:
    quick = quick_requested(__doc__, "256 and 512 only")
    shapes = SHAPES[:2] if quick else SHAPES
    print_table(f"Training step (forward + backward), trainable TrainableHLinear, float32, {torch.get_num_threads()} threads, "
                "kernel matrix at tol 1e-4 keep",
                ["layer", "batch", "leaves", "stored / dense numbers", "H time / dense", "H time / per-leaf loop",
                 "nuclear penalty / H step", "penalty / penalty formed densely"],
                rows(shapes))


if __name__ == "__main__":
    main()
