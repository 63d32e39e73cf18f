"""`DynamicCompression`: the paper's dynamic H-matrix training as a callback for a plain loop.

    dynamic = DynamicCompression(model, tol=1e-2, every=5, log="run.csv", metric=evaluate)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)   # after: the layers are swapped
    for epoch in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            loss = task_loss(model, batch) + lam * rank_penalty(model)
            loss.backward()
            optimizer.step()
        optimizer = dynamic.end_epoch(optimizer, loss=loss.item())

Every ``every`` epochs each `TrainableHLinear` is rebuilt from its dense equivalent (`recompress`) and the
optimizer rebuilt over the new parameters (`rebuild_optimizer`). Every epoch appends one row to
the log: what the H-matrices store (numbers and packed bytes, beside the dense weights), the
largest relative error of that epoch's recompression, and the task metric and values given.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from hmcompress.io.writer import atomic_write
from hmcompress.train.layers import Recompressed, footprint, rebuild_optimizer, recompress, replace_linears

Metric = Callable[[nn.Module], "Mapping[str, float] | float"]
LOG_FORMATS = (".csv", ".json")


class DynamicCompression:
    """Swaps ``model``'s `nn.Linear` layers (matching ``include``/``exclude``) for trainable
    `hmcompress.train.layers.HLinear` within ``tol``, then recompresses every ``every`` epochs.

    ``log``: a ``.csv`` or ``.json`` file rewritten (atomically) after every epoch. ``metric``:
    called with the model after each epoch (in eval mode, the mode restored afterwards); a number
    is logged as ``metric``, a mapping as its keys. ``swapped`` says what the swap did; ``last``
    holds the latest recompression's per-layer results; ``rows`` the log.
    """

    def __init__(self, model: nn.Module, tol: float = 1e-2, every: int = 1, *,
                 log: str | os.PathLike | None = None, metric: Metric | None = None,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (), precision: str = "keep",
                 leaf: int = 32, strategy: str = "optimal", absolute: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        self.log = pathlib.Path(log) if log is not None else None
        if self.log is not None and self.log.suffix not in LOG_FORMATS:
            raise ValueError(f"{self.log}: the log must end in {' or '.join(LOG_FORMATS)}")
        self.model, self.tol, self.every, self.metric = model, tol, every, metric
        self.swapped = replace_linears(model, tol, include=include, exclude=exclude, precision=precision,
                                  leaf=leaf, strategy=strategy, absolute=absolute)
        self.epoch = 0
        self.last: list[Recompressed] = []
        self.rows: list[dict] = []

    def end_epoch(self, optimizer: torch.optim.Optimizer | None = None,
                  **values: float) -> torch.optim.Optimizer | None:
        """Close an epoch: recompress if it is due, log, and return the optimizer to go on with
        (a rebuilt one after a recompression). ``values`` (e.g. ``loss=...``) join the log row."""
        self.epoch += 1
        recompressed = self.epoch % self.every == 0
        if recompressed:
            self.last = recompress(self.model)
            if optimizer is not None:
                optimizer = rebuild_optimizer(optimizer, self.model)
        size = footprint(self.model)
        row = {"epoch": self.epoch, "recompressed": recompressed, "tol": self.tol,
               "recompress_rel_error": max((r.rel_error for r in self.last), default=0.0) if recompressed else None,
               "stored_numbers": size.stored_numbers, "dense_numbers": size.dense_numbers,
               "stored_fraction": size.stored_fraction, "stored_bytes": size.stored_bytes,
               "dense_bytes": size.dense_bytes, "bytes_ratio": size.bytes_ratio, **values,
               **self._measure()}
        self.rows.append(row)
        if self.log is not None:
            rows = [{k: _finite_or_none(v) for k, v in r.items()} for r in self.rows]
            text = csv_text(rows) if self.log.suffix == ".csv" else json.dumps(rows, indent=1, allow_nan=False) + "\n"
            atomic_write(self.log, lambda tmp: tmp.write_text(text), overwrite=True)
        return optimizer

    def _measure(self) -> dict[str, float]:
        if self.metric is None:
            return {}
        training = self.model.training
        self.model.eval()
        try:
            result = self.metric(self.model)
        finally:
            self.model.train(training)
        return dict(result) if isinstance(result, Mapping) else {"metric": float(result)}


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV: the union of their keys in order of first appearance; absent or None
    values empty."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def _finite_or_none(value: object) -> object:
    """A value for the log: NaN and infinities (a diverged run) become empty / null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
