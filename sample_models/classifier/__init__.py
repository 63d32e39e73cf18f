"""MLP classifier for scikit-learn's bundled 8x8 handwritten digits.

It is the checkpoint behind ``make demo``: real trained weights (not random
ones) so compression error can be judged by the accuracy it costs, and small
enough to retrain on a laptop CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).with_name("classifier.safetensors")
N_FEATURES = 64
N_CLASSES = 10
HIDDEN = (512, 512, 256)
SPLIT_SEED = 0
TEST_SIZE = 0.2
METRIC = "accuracy"  # the headline of `evaluate` (hmcompress.evaluate.analysis protocol)
HIGHER_IS_BETTER = True


class DigitsMLP(nn.Module):
    """64 -> 512 -> 512 -> 256 -> 10 GELU MLP that standardises its own input.

    The mean/std live in buffers so the safetensors file alone is enough to
    run the model: no separate preprocessing state to ship or forget.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(N_FEATURES))
        self.register_buffer("input_std", torch.ones(N_FEATURES))
        widths = (N_FEATURES, *HIDDEN)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.GELU()]
        layers.append(nn.Linear(widths[-1], N_CLASSES))
        self.net = nn.Sequential(*layers)

    def set_input_stats(self, x: torch.Tensor) -> None:
        """Fit the standardisation on training inputs.

        std is floored at 1 (pixels range over 0..16): border pixels are
        (almost) always 0 in training, and dividing a rare non-zero test
        value by a tiny std would blow it up.
        """
        self.input_mean.copy_(x.mean(dim=0))
        self.input_std.copy_(x.std(dim=0).clamp_min(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.input_mean) / self.input_std)


def build() -> DigitsMLP:
    """Return the untrained architecture (identity standardisation)."""
    return DigitsMLP()


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: raw float32 pixels, int64 labels.

    The stratified split has a fixed seed, so every call (and every machine)
    sees the same held-out 360 images and reported accuracies are comparable.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data,
        digits.target,
        test_size=TEST_SIZE,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    return (
        torch.as_tensor(x_tr, dtype=torch.float32),
        torch.as_tensor(y_tr, dtype=torch.int64),
        torch.as_tensor(x_te, dtype=torch.float32),
        torch.as_tensor(y_te, dtype=torch.int64),
    )


@torch.no_grad()
def evaluate(model: nn.Module) -> dict[str, float | int]:
    """Test-split accuracy of ``model`` (put in eval mode)."""
    _, _, x_test, y_test = load_data()
    model.eval()
    correct = (model(x_test).argmax(dim=1) == y_test).sum().item()
    return {"accuracy": correct / len(y_test), "n_test": len(y_test)}


def sample_inputs(n: int) -> torch.Tensor:
    """The first ``n`` held-out images (raw pixels): fixed inputs for output and NTK comparisons."""
    return load_data()[2][:n]


def calibration_batches() -> list[torch.Tensor]:
    """The training images (raw pixels, 1437 of them) in batches of 256, in split order: the
    inputs `hmcompress calibrate` feeds the model (never the held-out test images)."""
    return list(load_data()[0].split(256))
