"""The character transformer: its corpus is fixed and the committed checkpoint scores what it claims."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sample_models import char_transformer as ct


def _recorded() -> dict[str, str]:
    with safe_open(str(ct.CHECKPOINT), framework="pt") as f:
        return f.metadata()


def test_corpus_is_the_fixed_stdlib_files_in_order() -> None:
    files = ct.corpus_files()
    assert [path.stem for path in files] == list(ct.MODULES) and all(path.is_file() for path in files)
    train, valid = ct.splits()
    total = sum(len(text) for text in ct.corpus())
    assert len(train) + len(valid) == total and 0.09 < len(valid) / total < 0.11
    assert int(train.max()) < ct.VOCAB and int(train.min()) >= 0
    inputs, targets = ct.validation_windows()
    assert inputs.shape == (ct.EVAL_CHARS // ct.CONTEXT, ct.CONTEXT)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = ct.build().eval()
    tokens = ct.sample_inputs(2)
    changed = tokens.clone()
    changed[:, 100:] = (changed[:, 100:] + 1) % ct.VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :100], b[:, :100])
    assert not torch.allclose(a[:, 100:], b[:, 100:])


def test_checkpoint_reaches_its_recorded_validation_loss() -> None:
    recorded = _recorded()
    if recorded["corpus_sha256"] != ct.corpus_fingerprint():
        pytest.skip(f"this Python ({recorded['python']} was used) ships other versions of the corpus files")
    model = ct.build()
    model.load_state_dict(load_file(str(ct.CHECKPOINT)))  # strict: keys and shapes match build()
    result = ct.evaluate(model)
    assert result["val_loss"] == pytest.approx(float(recorded["val_loss"]), abs=1e-3)
    assert result["val_loss"] < 2.0  # far below the 4.56 nats of a uniform guess over 96 characters
    assert ct.CHECKPOINT.stat().st_size < 5 * 2**20
