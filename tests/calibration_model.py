"""A tiny model package for the `hmcompress recalibrate` tests: ``build`` and ``calibration_loss``.

The "trained" model is `reference()` (seeded initial weights); the calibration loss asks the model
to reproduce the reference's outputs on fixed inputs, so compression error shows up in it.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def build() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 3))


def reference() -> nn.Sequential:
    torch.manual_seed(0)
    return build()


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return inputs, reference()(inputs)


def calibration_loss(model: nn.Module) -> torch.Tensor:
    inputs, targets = _data()
    return (model(inputs) - targets).square().mean()
