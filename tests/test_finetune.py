"""Fine-tuning after compression: compressed file -> trainable layers -> a few steps -> the same format."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hmcompress import runtime
from hmcompress.api import compress_checkpoint, stats_from_file, verify
from hmcompress.core.build import CompressionOptions
from hmcompress.io.writer import write_dense
from hmcompress.train.finetune import dense_state, load_compressed, save_compressed
from hmcompress.train.layers import TrainableHLinear


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


@pytest.fixture()
def checkpoint(tmp_path):
    """A model whose 64x64 weights are compressible (smooth kernels plus a little noise)."""
    torch.manual_seed(0)
    model = build()
    x = torch.linspace(0, 1, 64)
    with torch.no_grad():
        for layer, width in ((model[0], 0.1), (model[2], 0.3)):
            layer.weight.copy_(torch.exp(-(x[:, None] - x[None, :]).abs() / width) / 8
                               + 1e-4 * torch.randn(64, 64))
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def shim(directory, monkeypatch):
    """The hmruntime.py written beside a compressed file, imported from there."""
    spec = importlib.util.spec_from_file_location("hmruntime_under_test", directory / "hmruntime.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as `import hmruntime` would register it
    spec.loader.exec_module(module)
    return module


def test_compress_finetune_write_and_reload(checkpoint, tmp_path, monkeypatch) -> None:
    compressed = tmp_path / "model.hm.safetensors"
    compress_checkpoint(checkpoint, compressed, CompressionOptions(tol=1e-2, precision="keep"))

    model = build()
    assert load_compressed(model, compressed) == ["0", "2"]
    assert isinstance(model[0], TrainableHLinear) and type(model[4]) is nn.Linear
    assert model[0].options.tol == 1e-2 and model[0].options.precision == "keep"
    patched = build()
    runtime.patch(patched, compressed)
    torch.manual_seed(1)
    x = torch.randn(32, 64)
    torch.testing.assert_close(model(x), patched(x), rtol=1e-5, atol=1e-6)

    # a few steps on a task: the factors, dense leaves and biases train
    target = torch.sin(x[:, :4] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    numbers = model[0].stored_numbers

    tuned = tmp_path / "tuned.hm.safetensors"
    save_compressed(model, tuned)
    reloaded = build()
    assert shim(tmp_path, monkeypatch).patch(reloaded, tuned) == ["0", "2"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-6)
    again = build()
    load_compressed(again, tuned)  # the same structure comes back
    assert again[0].stored_numbers == numbers

    # the recorded statistics hold against the trained dense weights
    dense = tmp_path / "tuned.safetensors"
    write_dense(dense, dense_state(model))
    assert all(check.ok for check in verify(tuned, dense))
    meta, layers = stats_from_file(tuned)
    assert meta["options"]["trained"] is True
    assert {s.name for s in layers if s.compressed} == {"0.weight", "2.weight"}


def test_save_with_options_compresses_afresh(checkpoint, tmp_path) -> None:
    compressed = tmp_path / "model.hm.safetensors"
    compress_checkpoint(checkpoint, compressed, CompressionOptions(tol=1e-2, precision="keep"))
    model = build()
    load_compressed(model, compressed)
    exact, auto = tmp_path / "exact.hm.safetensors", tmp_path / "auto.hm.safetensors"
    save_compressed(model, exact)
    save_compressed(model, auto, options=CompressionOptions(tol=1e-2, precision="auto"))
    assert auto.stat().st_size < exact.stat().st_size  # integer codecs again
    dense = tmp_path / "dense.safetensors"
    write_dense(dense, dense_state(model))
    checks = verify(auto, dense)
    assert checks and all(c.ok and c.measured_error <= c.budget for c in checks)
    with pytest.raises(Exception, match="exists"):
        save_compressed(model, auto)
