"""Training checkpoints round-trip: the model alone, at the model's ratio, loadable into the bare model."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from helpers import compress_result
from safetensors.torch import save_file
from torch import nn


class TinyGPT(nn.Module):
    """nanoGPT's shape in miniature: embeddings, attention and MLP projections, a tied head."""

    def __init__(self, vocab: int = 96, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
                                                   "fc": nn.Linear(width, 4 * width),
                                                   "out": nn.Linear(4 * width, width)}) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        for block in self.blocks:
            x = x + block["proj"](block["attn"](x)[..., : x.shape[-1]])
            x = x + block["out"](torch.relu(block["fc"](x)))
        return self.head(x)


def build() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """nanoGPT's ckpt.pt layout (a compiled model's `_orig_mod.` names, AdamW state after a step,
    model_args, iter_num, a tensor best_val_loss) and the bare state dict beside it."""
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    state = {f"_orig_mod.{name}": tensor for name, tensor in model.state_dict().items()}
    directory = tmp_path_factory.mktemp("training")
    path = directory / "ckpt.pt"
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "iter_num": 3,
                "model_args": {"n_layer": 2, "n_embd": 64, "vocab_size": 96}, "best_val_loss": torch.tensor(1.5),
                "config": {"learning_rate": 1e-3, "compile": True}}, path)
    bare = directory / "bare.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(bare))
    return path, bare


def shim(directory: pathlib.Path):
    """The hmruntime.py written beside a file, imported from there (as Python's docs import a file)."""
    name = f"hmruntime_{abs(hash(directory))}"
    spec = importlib.util.spec_from_file_location(name, directory / "hmruntime.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_model_only_loads_into_the_bare_model_at_the_model_ratio(cli, training_checkpoint, tmp_path):
    path, bare = training_checkpoint
    out = tmp_path / "ckpt.hm.safetensors"
    run = cli("compress", path, "-o", out, "--model-only", "--json", "-q")
    assert run.code == 0, run.stderr
    result = compress_result(run.stdout)
    alone = compress_result(cli("compress", bare, "-o", tmp_path / "bare.hm.safetensors", "--json", "-q").stdout)
    assert result["totals"]["ratio"] == pytest.approx(alone["totals"]["ratio"], rel=1e-12)
    assert result["totals"]["ratio"] > 3
    assert result["removed_prefix"] == "model._orig_mod."
    assert set(result["dropped"].values()) == {"optimizer state (--drop-optimizer)", "not part of the model (--model-only)"}
    assert {"iter_num", "model_args.n_layer", "config.compile"} <= set(result["extra"])

    runtime = shim(tmp_path)
    model, reference = build(), build()
    reference.load_state_dict(runtime.load_state_dict(out))
    assert runtime.patch(model, out)  # no option: the names are the bare model's
    tokens = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model(tokens), reference(tokens), atol=1e-5)
    # verify finds the matrices in the full training checkpoint under the prefix it removed, and in the bare one
    for original in (path, bare):
        run = cli("verify", out, "--original", original)
        assert run.code == 0, run.stderr


def test_the_report_says_what_was_kept_dropped_and_renamed(cli, training_checkpoint, tmp_path):
    path, _bare = training_checkpoint
    run = cli("compress", path, "-o", tmp_path / "x.hm.safetensors", "--model-only")
    assert run.code == 0, run.stderr
    assert "dropped: " in run.stdout and "optimizer state" in run.stdout
    assert "renamed: 'model._orig_mod.' removed from the start of" in run.stdout
    assert "kept in the file's header" in run.stdout and "iter_num" in run.stdout


def test_without_model_only_a_prefix_loads_the_model(cli, training_checkpoint, tmp_path):
    path, _bare = training_checkpoint
    out = tmp_path / "ckpt.hm.safetensors"
    run = cli("compress", path, "-o", out, "--drop-optimizer", "--json", "-q")
    assert run.code == 0, run.stderr
    assert not any(name.startswith("optimizer.") for name in
                   (layer["name"] for layer in compress_result(run.stdout)["layers"]))
    runtime = shim(tmp_path)
    with pytest.raises(RuntimeError, match="prefix='model.'"):
        runtime.patch(build(), out)
    model = build()
    assert runtime.patch(model, out, prefix="model._orig_mod.")
    partial = runtime.patch(nn.Sequential(nn.Linear(64, 64)), out, prefix="model._orig_mod.", strict=False)
    assert partial.missing_keys == ["0.bias", "0.weight"] and "wte.weight" in partial.unexpected_keys


def test_by_default_nothing_is_dropped(cli, training_checkpoint, tmp_path):
    path, _bare = training_checkpoint
    run = cli("compress", path, "-o", tmp_path / "all.hm.safetensors", "--json", "-q")
    result = compress_result(run.stdout)
    assert result["dropped"] == {} and result["removed_prefix"] == ""
    assert any(layer["reason"] == "optimizer state" for layer in result["layers"])


def test_model_only_refuses_a_bare_state_dict_with_other_parts(cli, tmp_path):
    path = tmp_path / "llama.safetensors"
    save_file({"model.layers.0.weight": torch.randn(64, 64), "lm_head.weight": torch.randn(96, 64)}, str(path))
    run = cli("compress", path, "--model-only", "--json")
    assert run.code == 2 and "bare state dict" in run.error_line()
    assert json.loads(run.stdout)["ok"] is False
