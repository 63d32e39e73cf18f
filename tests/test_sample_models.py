"""The committed sample checkpoint must still load and score what it claims."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")


from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sample_models.classifier import CHECKPOINT, build, evaluate, load_data  # noqa: E402


def test_checkpoint_reaches_recorded_accuracy() -> None:
    with safe_open(str(CHECKPOINT), framework="pt") as f:
        metadata = f.metadata()
    model = build()
    model.load_state_dict(load_file(str(CHECKPOINT)))  # strict: keys and shapes match build()
    result = evaluate(model)
    assert result["n_test"] == int(metadata["n_test"])
    assert result["accuracy"] >= 0.96
    # One image of slack: another BLAS may round a borderline logit the other way.
    assert result["accuracy"] == pytest.approx(float(metadata["accuracy"]), abs=1 / result["n_test"])


def test_load_data_is_deterministic() -> None:
    first, second = load_data(), load_data()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    x_train, y_train, x_test, y_test = first
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_test.unique().numel() == 10  # stratified: every digit is in the held-out split
