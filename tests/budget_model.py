"""A tiny model package for the `--model-tol` tests: ``build``, ``calibration_batches`` and a hook
that raises. The "trained" weights are `reference()` (seeded); its inputs are anisotropic, as a
trained layer's are."""
from __future__ import annotations

import torch
from torch import nn


def build() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 32),
                         nn.Tanh(), nn.Linear(32, 8))


def reference() -> nn.Sequential:
    torch.manual_seed(0)
    return build()


def inputs(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 16, generator=gen) * torch.logspace(0.5, -1, 16)


def calibration_batches() -> list[torch.Tensor]:
    return [inputs(128, seed) for seed in range(4)]


def bad_batches() -> list[torch.Tensor]:
    raise RuntimeError("no data today")
