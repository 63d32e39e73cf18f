"""Physics-informed network for the viscous Burgers equation (the paper's PINN example).

u_t + u u_x = (0.01/pi) u_xx on x in [-1, 1], t in [0, 1]; u(x, 0) = -sin(pi x); u(+-1, t) = 0.
The network is a plain tanh MLP (x, t) -> u. Its derivatives are propagated forward together with
its values (value, d/dx, d/dt, d2/dx2 stacked into one batch per layer), calling the layer modules
themselves: this is several times cheaper than nested autograd, needs no graph at evaluation time,
and works unchanged after `hmruntime.patch` has replaced the layers by H-matrix ones.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .reference import NU, exact_solution

CHECKPOINT = Path(__file__).with_name("burgers_pinn.safetensors")
WIDTH = 128
HIDDEN_LAYERS = 6
GRID_X = 256  # evaluation grid: x = linspace(-1, 1, 256), t = linspace(0, 1, 101)
GRID_T = 101
SAMPLE_SEED = 1234
METRIC = "rel_l2"
HIGHER_IS_BETTER = False


class BurgersPINN(nn.Module):
    """2 -> WIDTH x HIDDEN_LAYERS (tanh) -> 1; inputs are (x, t), rescaled inside to [-1, 1]^2."""

    def __init__(self, width: int = WIDTH, hidden_layers: int = HIDDEN_LAYERS) -> None:
        super().__init__()
        widths = [2] + [width] * hidden_layers + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # (x, t) -> (x, 2t - 1); not state, so not in the checkpoint.
        self.register_buffer("input_scale", torch.tensor([1.0, 2.0]), persistent=False)
        self.register_buffer("input_shift", torch.tensor([0.0, -1.0]), persistent=False)

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        """u at points ``xt`` of shape (n, 2); returns (n, 1)."""
        h = xt * self.input_scale + self.input_shift
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return self.layers[-1](h)

    def jets(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, u_x, u_t, u_xx) at points ``xt`` (n, 2), each of shape (n,).

        Derivatives pass a layer without its bias: layer(v) - layer(0) is the linear part of any
        affine layer, whatever its implementation.
        """
        n = xt.shape[0]
        h = xt * self.input_scale + self.input_shift
        hx = self.input_scale.new_tensor([1.0, 0.0]).mul(self.input_scale).expand(n, 2)
        ht = self.input_scale.new_tensor([0.0, 1.0]).mul(self.input_scale).expand(n, 2)
        hxx = torch.zeros_like(h)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            out = layer(torch.cat([h, hx, ht, hxx]))
            offset = layer(h.new_zeros(1, h.shape[1]))
            z, zx, zt, zxx = out[:n], out[n:2 * n] - offset, out[2 * n:3 * n] - offset, out[3 * n:] - offset
            if i == last:
                return z[:, 0], zx[:, 0], zt[:, 0], zxx[:, 0]
            h = torch.tanh(z)
            slope = 1.0 - h * h  # tanh' ; tanh'' = -2 tanh tanh'
            hx, ht = slope * zx, slope * zt
            hxx = slope * zxx - 2.0 * h * slope * zx * zx
        raise AssertionError("unreachable: the network has an output layer")

    def residual(self, xt: torch.Tensor) -> torch.Tensor:
        """PDE residual u_t + u u_x - nu u_xx at points ``xt`` (n, 2)."""
        u, ux, ut, uxx = self.jets(xt)
        return ut + u * ux - NU * uxx


def build() -> BurgersPINN:
    """The untrained architecture."""
    return BurgersPINN()


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Evaluation points (GRID_T * GRID_X, 2) in float64 and the exact u there."""
    x, t = np.meshgrid(np.linspace(-1.0, 1.0, GRID_X), np.linspace(0.0, 1.0, GRID_T))
    points = np.stack([x.ravel(), t.ravel()], axis=1)
    return points, exact_solution(points[:, 0], points[:, 1])


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation grid points (float32, (n, 2)) and the reference solution there (float64, (n,))."""
    points, exact = _grid()
    return torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(exact)


@torch.no_grad()
def evaluate(model: nn.Module) -> dict[str, float]:
    """Relative L2 error against the exact solution on the grid, and the mean |PDE residual|.

    Works for any module with the ``jets`` method (the shim's patched model included).
    """
    model.eval()
    points, exact = grid()
    u, ux, ut, uxx = model.jets(points)
    residual = ut + u * ux - NU * uxx
    error = u.double() - exact
    return {"rel_l2": float(error.norm() / exact.norm()),
            "max_abs_error": float(error.abs().max()),
            "mean_abs_residual": float(residual.abs().mean())}


def calibration_loss(model: nn.Module) -> torch.Tensor:
    """The training loss (mean squared PDE residual plus weighted initial/boundary misfit) on the
    training script's first point set: what `hmcompress recalibrate` minimises. Needs no data."""
    from .train import loss

    return loss(model, _calibration_points())


@functools.lru_cache(maxsize=1)
def _calibration_points() -> dict[str, torch.Tensor]:
    from .train import SEED, training_points

    return training_points(torch.Generator().manual_seed(SEED))


def calibration_batches() -> list[torch.Tensor]:
    """The training set's points (x, t) for `hmcompress calibrate`: the interior collocation
    points of the training script's first point set, then its initial and boundary points
    (2600 in all), in batches of at most 1000, each fed through ``model(points)``."""
    points = _calibration_points()
    return [*points["interior"].split(1000), points["edge"]]


def sample_inputs(n: int) -> torch.Tensor:
    """``n`` fixed points (x, t) drawn uniformly from the domain (seeded), shape (n, 2)."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    unit = torch.rand(n, 2, generator=generator)
    return unit * torch.tensor([2.0, 1.0]) + torch.tensor([-1.0, 0.0])
