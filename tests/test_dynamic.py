"""DynamicCompression: recompression every N epochs from a plain loop, and its per-epoch log."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from hmcompress.train.dynamic import DynamicCompression
from hmcompress.train.layers import TrainableHLinear, rank_penalty


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small regression whose target map is nearly rank 3, so the penalty can find it."""
    torch.manual_seed(0)
    target = torch.randn(32, 3) @ torch.randn(3, 32) / 4 + 0.01 * torch.randn(32, 32)
    x = torch.randn(128, 32)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    return model, x, torch.tanh(x @ target.T) @ target.T


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_log_has_ratio_and_error_every_epoch(tmp_path, suffix: str) -> None:
    model, x, y = problem()
    log = tmp_path / f"run{suffix}"
    seen = []

    def metric(m: nn.Module) -> dict[str, float]:
        seen.append(m.training)
        with torch.no_grad():
            return {"mse": float((m(x) - y).square().mean())}

    dynamic = DynamicCompression(model, tol=1e-2, every=2, log=log, metric=metric, leaf=8)
    assert [s.name for s in dynamic.swapped] == ["0", "2"] and isinstance(model[0], TrainableHLinear)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(5):
        for _ in range(10):
            optimizer.zero_grad()
            loss = (model(x) - y).square().mean() + 1e-3 * rank_penalty(model)
            loss.backward()
            optimizer.step()
        optimizer = dynamic.end_epoch(optimizer, loss=loss.item())
    if suffix == ".csv":
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(log.read_text())
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert seen == [False] * 5 and model.training  # the metric ran in eval mode, training resumed
    for row in rows:
        assert 0 < float(row["stored_fraction"]) <= 1 and float(row["bytes_ratio"]) > 0
        assert float(row["stored_fraction"]) == int(row["stored_numbers"]) / int(row["dense_numbers"])
        assert float(row["mse"]) >= 0 and float(row["loss"]) >= 0
        recompressed = str(row["recompressed"]) in ("True", "true")
        assert recompressed == (int(row["epoch"]) % 2 == 0)
        if recompressed:
            assert 0 <= float(row["recompress_rel_error"]) <= 1e-2
        else:
            assert row["recompress_rel_error"] in ("", None)
    assert all(r.error <= r.budget for r in dynamic.last)
    # the optimizer returned after a recompression trains the new parameters
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_a_scalar_metric_and_no_log() -> None:
    model, x, y = problem()
    dynamic = DynamicCompression(model, tol=1e-1, every=1, metric=lambda _model: 0.5)
    assert dynamic.end_epoch() is None
    assert dynamic.rows[0]["metric"] == 0.5 and dynamic.rows[0]["recompressed"] is True


def test_bad_arguments() -> None:
    model, _, _ = problem()
    with pytest.raises(ValueError, match="every must be >= 1"):
        DynamicCompression(model, every=0)
    with pytest.raises(ValueError, match="must end in .csv or .json"):
        DynamicCompression(model, log="run.txt")
