"""The paper's Figure 3 for the Burgers PINN: training with dynamic H-matrix compression.

Usage: ``python -m sample_models.burgers_pinn.dynamic [--out DIR] [--lam L] ...``

Three runs from the same seeded start, with the same points, optimizers and schedule: a dense
PINN (plain `nn.Linear`), and two whose weight matrices are trainable H-matrices recompressed at
``--tol`` every ``--every`` epochs (`hmcompress.train.dynamic.DynamicCompression`), without and with the
nuclear-norm rank penalty ``--lam`` (applied for the first ``--penalty-epochs`` epochs; the last
ones train the structure it found). The schedule is `train`'s, shortened: Adam epochs, then L-BFGS
epochs with residual-based refinement of the collocation points (an L-BFGS history does not
survive a change of parameters: each recompression starts a fresh one). Per epoch: relative L2
error against the exact solution and the stored numbers of the weight matrices over their dense
count. Writes ``dynamic.csv``, ``dynamic.md`` (summary and per-epoch table), ``dynamic.png``
(needs matplotlib, the ``plot`` extra) and each dynamic run's `DynamicCompression` log
``log-<run>.csv`` to ``--out``. The network is narrower than the committed
checkpoint's so that the three runs take minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

import torch
from torch import nn

from hmcompress.io.writer import atomic_write
from hmcompress.train.dynamic import DynamicCompression, csv_text
from hmcompress.train.layers import rank_penalty
from sample_models.burgers_pinn import BurgersPINN, evaluate
from sample_models.burgers_pinn.train import loss, refine, training_points
from sample_models.training import make_deterministic

RUNS = ("dense", "dynamic", "dynamic+penalty")


@dataclasses.dataclass(frozen=True)
class Settings:
    width: int = 64
    hidden_layers: int = 4
    collocation: int = 1000  # interior points used at first (of train.training_points' set)
    adam_epochs: int = 5
    lbfgs_epochs: int = 25
    steps: int = 100  # Adam steps, or L-BFGS iterations, per epoch
    lr: float = 1e-3  # Adam
    refine_every: int = 5  # L-BFGS epochs between refinements of the collocation set
    tol: float = 1e-2
    every: int = 2  # epochs between recompressions
    lam: float = 2e-3
    penalty_epochs: int = 22
    leaf: int = 16
    seed: int = 0  # initial weights and refinement candidates (the first collocation set is fixed)

    @property
    def epochs(self) -> int:
        return self.adam_epochs + self.lbfgs_epochs


def train(settings: Settings, run: str, log: pathlib.Path, progress) -> list[dict]:
    """One run; returns its per-epoch rows (epoch, rel_l2, loss, stored/dense numbers, ...)."""
    generator = make_deterministic(settings.seed, 1)
    model = BurgersPINN(settings.width, settings.hidden_layers)
    for layer in model.layers:  # Glorot, as usual for tanh PINNs
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
    points = training_points(generator)
    points["interior"] = points["interior"][:settings.collocation]
    dense_numbers = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    dynamic = None
    if run != "dense":
        dynamic = DynamicCompression(model, settings.tol, settings.every, log=log, leaf=settings.leaf,
                                     metric=lambda m: {"rel_l2": evaluate(m)["rel_l2"]})
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    rows = []
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        lam = settings.lam if run == "dynamic+penalty" and epoch < settings.penalty_epochs else 0.0

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            total = loss(model, points) + (lam * rank_penalty(model) if lam else 0.0)
            total.backward()
            return total

        undone = False
        if epoch < settings.adam_epochs:
            for _ in range(settings.steps):
                objective()
                optimizer.step()
        else:
            lbfgs_epoch = epoch - settings.adam_epochs
            if lbfgs_epoch == 0:
                optimizer = lbfgs(model, settings.steps)
            if lbfgs_epoch % settings.refine_every == 0:
                refine(model, points, generator)
            undone = not kept_step(model, optimizer, objective)
            if undone:
                optimizer = lbfgs(model, settings.steps)
        with torch.no_grad():
            values = {"loss": loss(model, points).item(), "seconds": round(time.perf_counter() - start, 1),
                      "undone": undone}
        if dynamic is None:
            row = {"epoch": epoch + 1, **values, "rel_l2": evaluate(model)["rel_l2"],
                   "stored_numbers": dense_numbers, "dense_numbers": dense_numbers, "stored_fraction": 1.0}
            model.train()
        else:
            optimizer = dynamic.end_epoch(optimizer, **values)
            row = dynamic.rows[-1]
        rows.append({"run": run, **row})
        progress(f"{run} epoch {epoch + 1}: loss {values['loss']:.3e}, rel_l2 {row['rel_l2']:.3e}, "
                 f"stored {row['stored_fraction']:.3f} of dense, {values['seconds']:.0f}s"
                 f"{' (diverging L-BFGS step undone)' if undone else ''}")
    return rows


def lbfgs(model: nn.Module, steps: int) -> torch.optim.LBFGS:
    """L-BFGS as `train` uses it, ``steps`` iterations per call of ``step``."""
    return torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, history_size=50, tolerance_grad=1e-9,
                             tolerance_change=1e-12, line_search_fn="strong_wolfe")


def kept_step(model: nn.Module, optimizer: torch.optim.LBFGS, objective) -> bool:
    """One L-BFGS call, undone if it diverged (parameters not finite, or a line-search step that
    overflows float32, which torch reports as a RuntimeError); returns whether it was kept."""
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        optimizer.step(objective)
        kept = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        kept = False
    if not kept:
        model.load_state_dict(saved)
    return kept


def summary(rows: list[dict]) -> dict[str, dict]:
    """Each run's final rel L2 and stored fraction, and the issue's two criteria."""
    final = {run: [r for r in rows if r["run"] == run][-1] for run in RUNS}
    dense = final["dense"]["rel_l2"]
    return {run: {"rel_l2": r["rel_l2"], "stored_fraction": r["stored_fraction"],
                  "l2_over_dense": r["rel_l2"] / dense if dense > 0 else math.inf,
                  "meets": r["rel_l2"] <= 2 * dense and r["stored_fraction"] <= 0.5}
            for run, r in final.items()}


def markdown(settings: Settings, rows: list[dict], seconds: float) -> str:
    """The summary and the per-epoch table."""
    lines = [f"Settings: {dataclasses.asdict(settings)}; {seconds:.0f} s in total.", "",
             "| run | final rel. L2 | L2 / dense L2 | stored / dense numbers | within 2x of dense and <= 1/2 |",
             "|---|---|---|---|---|"]
    for run, s in summary(rows).items():
        lines.append(f"| {run} | {s['rel_l2']:.3e} | {s['l2_over_dense']:.2f} | {s['stored_fraction']:.3f} | "
                     f"{'yes' if s['meets'] else 'no'} |")
    lines += ["", "| epoch | " + " | ".join(f"{run} L2 | {run} stored" for run in RUNS) + " |",
              "|---|" + "---|---|" * len(RUNS)]
    for epoch in range(1, settings.epochs + 1):
        cells = []
        for run in RUNS:
            r = next(r for r in rows if r["run"] == run and r["epoch"] == epoch)
            cells += [f"{r['rel_l2']:.3e}", f"{r['stored_fraction']:.3f}"]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(settings: Settings, rows: list[dict], path: pathlib.Path) -> None:
    """Figure 3: rel L2 error (log) and stored fraction against epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in RUNS:
        mine = [r for r in rows if r["run"] == run]
        epochs = [r["epoch"] for r in mine]
        left.semilogy(epochs, [r["rel_l2"] for r in mine], label=run)
        right.plot(epochs, [r["stored_fraction"] for r in mine], label=run)
    for axes in (left, right):
        axes.axvline(settings.penalty_epochs + 0.5, color="grey", linestyle="--", linewidth=1)
    right.text(settings.penalty_epochs + 0.8, 0.9, "penalty off", color="grey")
    left.set(xlabel="epoch", ylabel="relative L2 error", title="Accuracy")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    right.set(xlabel="epoch", ylabel="stored / dense numbers", ylim=(0, 1.05),
              title=f"Weights stored (H-matrix, tol {settings.tol:g})")
    left.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}),
                 overwrite=True)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/burgers_dynamic"))
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--no-plot", action="store_true", help="skip dynamic.png")
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    args.out.mkdir(parents=True, exist_ok=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = []
    for run in RUNS:
        rows += train(settings, run, args.out / f"log-{run}.csv", progress)
    seconds = time.perf_counter() - start
    table = csv_text(rows)
    atomic_write(args.out / "dynamic.csv", lambda tmp: tmp.write_text(table), overwrite=True)
    text = markdown(settings, rows, seconds)
    atomic_write(args.out / "dynamic.md", lambda tmp: tmp.write_text(text), overwrite=True)
    if not args.no_plot:
        plot(settings, rows, args.out / "dynamic.png")
    print(text.split("\n\n")[1])


if __name__ == "__main__":
    main()
