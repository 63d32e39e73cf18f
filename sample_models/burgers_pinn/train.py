"""Train the Burgers PINN and write ``burgers_pinn.safetensors``.

Usage: ``python -m sample_models.burgers_pinn.train [--out PATH]``

Adam first (robust from a random start), then rounds of residual-based adaptive refinement (the
candidate points where the PDE is worst satisfied join the collocation set, which puts points on
the shock at x = 0), each followed by L-BFGS, which is what takes a PINN to ~1e-3. Everything is
seeded, runs in one thread and uses deterministic algorithms, so a rerun on the same torch build
reproduces the weights.
"""
from __future__ import annotations

import torch

from sample_models.burgers_pinn import CHECKPOINT, HIDDEN_LAYERS, WIDTH, BurgersPINN, build, evaluate
from sample_models.training import Log, make_deterministic, run

SEED = 0
THREADS = 1  # fixed: a different thread count may round differently and L-BFGS amplifies it
COLLOCATION = 2000  # interior points (Sobol)
BOUNDARY = 200  # points on each of: t = 0, x = -1, x = 1
EDGE_WEIGHT = 10.0  # the initial condition decides where the shock forms: fit it first
ADAM_STEPS = 2000
ADAM_LR = 1e-3
ROUNDS = 5  # each: refine the collocation set, then L-BFGS
REFINE_CANDIDATES = 20000
REFINE_ADDED = 300
LBFGS_STEPS = 1000  # per round
LOG_EVERY = 250


def training_points(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Interior collocation points and the initial/boundary points with their target values."""
    sobol = torch.quasirandom.SobolEngine(2, scramble=True, seed=SEED)
    interior = sobol.draw(COLLOCATION) * torch.tensor([2.0, 1.0]) + torch.tensor([-1.0, 0.0])
    x0 = torch.rand(BOUNDARY, generator=generator) * 2 - 1
    tb = torch.rand(2 * BOUNDARY, generator=generator)
    xb = torch.cat([-torch.ones(BOUNDARY), torch.ones(BOUNDARY)])
    edge = torch.cat([torch.stack([x0, torch.zeros(BOUNDARY)], 1), torch.stack([xb, tb], 1)])
    target = torch.cat([-torch.sin(torch.pi * x0), torch.zeros(2 * BOUNDARY)])
    return {"interior": interior, "edge": edge, "edge_target": target}


def loss(model: BurgersPINN, points: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared PDE residual plus EDGE_WEIGHT x mean squared initial/boundary misfit."""
    residual = model.residual(points["interior"])
    misfit = model(points["edge"])[:, 0] - points["edge_target"]
    return residual.square().mean() + EDGE_WEIGHT * misfit.square().mean()


def refine(model: BurgersPINN, points: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Add the REFINE_ADDED candidate points with the largest |residual| to the interior set."""
    candidates = torch.rand(REFINE_CANDIDATES, 2, generator=generator) * torch.tensor([2.0, 1.0])
    candidates += torch.tensor([-1.0, 0.0])
    with torch.no_grad():
        worst = model.residual(candidates).abs().topk(REFINE_ADDED).indices.sort().values
    points["interior"] = torch.cat([points["interior"], candidates[worst]])


def train(log: Log | None = None) -> BurgersPINN:
    """Fit a fresh model: Adam, then rounds of (refine the collocation set, L-BFGS)."""
    generator = make_deterministic(SEED, THREADS)
    model = build()
    points = training_points(generator)

    def report(stage: str, step: int, value: float) -> None:
        if log and step % LOG_EVERY == 0:
            log(f"{stage} {step}: loss {value:.3e}, rel_l2 {evaluate(model)['rel_l2']:.3e}")
            model.train()

    adam = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    for step in range(ADAM_STEPS):
        adam.zero_grad()
        value = loss(model, points)
        value.backward()
        adam.step()
        report("adam", step, value.item())
    evaluations = [0]
    for _ in range(ROUNDS):
        refine(model, points, generator)
        lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=LBFGS_STEPS, history_size=50,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            value = loss(model, points)
            value.backward()
            report("lbfgs", evaluations[0], value.item())
            evaluations[0] += 1
            return value

        lbfgs.step(closure)
    return model


def main(argv: list[str] | None = None) -> None:
    run(__doc__.splitlines()[0], CHECKPOINT, train, evaluate, {
        "model": f"burgers-pinn-tanh-2-{WIDTH}x{HIDDEN_LAYERS}-1",
        "seed": str(SEED),
        "threads": str(THREADS),
        "collocation": f"{COLLOCATION}+{ROUNDS}x{REFINE_ADDED} refined",
        "edge_weight": str(EDGE_WEIGHT),
        "adam_steps": str(ADAM_STEPS),
        "lbfgs_steps": f"{ROUNDS}x{LBFGS_STEPS}",
    }, argv)


if __name__ == "__main__":
    main()
