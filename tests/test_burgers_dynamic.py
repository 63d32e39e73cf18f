"""The Figure 3 script, on a tiny network and schedule (the real run is `python -m
sample_models.burgers_pinn.dynamic`, minutes long)."""
from __future__ import annotations

import csv

import pytest
import torch

from sample_models.burgers_pinn import dynamic


@pytest.mark.slow
def test_script_writes_table_and_plot(tmp_path, capsys) -> None:
    dynamic.main(["--out", str(tmp_path), "--width", "16", "--hidden-layers", "2", "--collocation", "100",
                  "--adam-epochs", "1", "--lbfgs-epochs", "2", "--steps", "3", "--refine-every", "1",
                  "--every", "1", "--penalty-epochs", "2", "--leaf", "8"])
    with open(tmp_path / "dynamic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], int(r["epoch"])) for r in rows] == [(run, e) for run in dynamic.RUNS for e in (1, 2, 3)]
    for row in rows:
        assert 0 < float(row["rel_l2"]) and 0 < float(row["stored_fraction"]) <= 1
    for run in dynamic.RUNS[1:]:  # each dynamic run's own epoch log
        assert (tmp_path / f"log-{run}.csv").exists()
    assert (tmp_path / "dynamic.png").read_bytes().startswith(b"\x89PNG")
    table = (tmp_path / "dynamic.md").read_text()
    assert "| dynamic+penalty |" in table and "| 3 |" in table
    assert "| run | final rel. L2 |" in capsys.readouterr().out


def test_a_diverging_lbfgs_step_is_undone() -> None:
    model = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = dynamic.lbfgs(model, 3)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        value = model(torch.ones(2, 3)).sum() * float("nan")
        value.backward()
        return value

    assert not dynamic.kept_step(model, optimizer, objective)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
