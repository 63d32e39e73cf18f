"""How much each direction of a layer's outputs matters to the model's output: K = E[Jᵀ J].

A layer y = W x inside a model f: an error E of W moves f's output by J E x, J the Jacobian of
f with respect to y at that input. Summed over the calibration inputs, ||J E x||² is about
tr(K E G Eᵀ), G = E[x xᵀ] the layer's inputs' second moment (`calibrate`) and K = E[Jᵀ J] the
second moment of what the output sends back to y: the Kronecker-factored approximation of K-FAC
(Martens & Grosse, 2015), which treats J and x as independent. On the char transformer, K is far
from a multiple of the identity (its eigenvalues' arithmetic over geometric mean is 2.7 to 29
on the attention and second MLP layers, a one-off measurement): rounding a layer's rows for tr(K E G Eᵀ) rather than for
tr(E G Eᵀ) moves its error into directions that the rest of the model hardly passes on
(`feedback.two_sided_round`), which `--model-tol` uses.

K is estimated with random probes: for v with independent standard normal entries, E_v[Jᵀ v vᵀ
J] = Jᵀ J, so K is the second moment of the gradients of ⟨f, v⟩ with respect to y.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hmcompress.calibrate import _eligible, _weight_names, feed, output_tensors
from hmcompress.errors import UserError

PROBES = 2  # random output directions a batch
SEED = 0  # the probes' generator: the same data give the same K, and the same file
MAX_SIZE = 4096  # larger K or M are left out (m x m float64: 128 MiB at this size)


def collect_output_grams(model: nn.Module, batches: Iterable, data: str, names: set[str],
                         columns: set[str] = frozenset(), probes: int = PROBES) -> dict[str, torch.Tensor]:
    """Over ``batches`` as `calibrate.feed` passes them: K (m x m, float64) of each layer
    (nn.Linear, ungrouped Conv1d/Conv2d: output channels, at most `MAX_SIZE` of them) whose
    weight is named in ``names`` (its `model.state_dict()` name), and M (n x n) of each
    parameter named in ``columns`` (at least 2-D, its matrix at most `MAX_SIZE` columns: an
    embedding table, a position table): the second moment of the gradients its rows receive,
    which says what an error along each direction of its rows does to the output (the rows of an
    embedding are looked up, not multiplied). Layers and parameters no gradient reaches are left
    out. The model's parameters are made to require gradients for the run (and put back). A
    model that cannot run with gradients raises `UserError` (one line)."""
    weight_names = _weight_names(model)
    modules = {m: weight_names[id(m.weight)] for m in model.modules()
               if _eligible(m, conv=True) and isinstance(getattr(m, "weight", None), torch.Tensor)
               and weight_names.get(id(m.weight)) in names and m.weight.shape[0] <= MAX_SIZE}
    parameters = [(name, p, None) for p in model.parameters() for name in [weight_names.get(id(p))]
                  if name in columns and p.dim() >= 2 and p[0].numel() <= MAX_SIZE]
    outputs: list[tuple[str, torch.Tensor, int | None]] = []  # weight name, output, its channels' dimension

    def hook(module: nn.Module, _args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and output.dim() >= 1:
            channels = -1 if isinstance(module, nn.Linear) or output.dim() == 1 else output.dim() - module.weight.dim() + 1
            outputs.append((modules[module], output, channels))

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    generator = torch.Generator().manual_seed(SEED)
    wanted = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for p in wanted:
            p.requires_grad_(True)
        for output in feed(model, batches, data, grad=True):
            leaves = [t for t in output_tensors(output) if t.is_floating_point() and t.requires_grad]
            if (outputs or parameters) and leaves:
                _accumulate(outputs + parameters, leaves, probes, generator, sums, counts)
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in wanted.items():
            p.requires_grad_(flag)
    return {name: sums[name] / counts[name] for name in sorted(sums) if bool(sums[name].diagonal().sum() > 0)}


def _accumulate(targets: list[tuple[str, torch.Tensor, int | None]], leaves: list[torch.Tensor], probes: int,
                generator: torch.Generator, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Add one batch's probes' gradient second moments to ``sums`` (rows counted in ``counts``):
    by channel of a layer's output (``channels`` its dimension), by row of a parameter (None)."""
    captured = [t for _name, t, _channels in targets]
    for _ in range(probes):
        probe = sum((leaf * torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)).sum()
                    for leaf in leaves)
        try:
            grads = torch.autograd.grad(probe, captured, retain_graph=True, allow_unused=True)
        except RuntimeError as err:  # the model's own graph (in-place edits, detached outputs)
            raise UserError(f"the model's outputs could not be differentiated ({' '.join(str(err).split())})") from err
        for (name, _target, channels), grad in zip(targets, grads):
            if grad is None:
                continue
            if channels is None:
                rows = grad.reshape(grad.shape[0], -1).detach().double().cpu()
            else:
                rows = grad.movedim(channels, -1).reshape(-1, grad.shape[channels]).detach().double().cpu()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
