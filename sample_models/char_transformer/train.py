"""Train the character transformer and write ``char_transformer.safetensors``.

Usage: ``python -m sample_models.char_transformer.train [--out PATH]``

AdamW with a linear warm-up and a cosine decay on random windows of the training text. The
windows come from a seeded generator, the run uses one thread and deterministic algorithms, so a
rerun on the same torch build and Python (same corpus) reproduces the weights.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from sample_models.char_transformer import (
    CHECKPOINT,
    CONTEXT,
    D_MODEL,
    FF,
    HEADS,
    LAYERS,
    MODULES,
    VOCAB,
    CharTransformer,
    build,
    corpus_fingerprint,
    evaluate,
    splits,
)
from sample_models.training import Log, make_deterministic, run

SEED = 0
THREADS = 1  # fixed: a different thread count may round differently
STEPS = 1200
BATCH_SIZE = 16
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
LOG_EVERY = 200


def learning_rate(step: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 0 at STEPS."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def train(log: Log | None = None) -> CharTransformer:
    """Fit a fresh model on random CONTEXT-character windows of the training text."""
    generator = make_deterministic(SEED, THREADS)
    train_tokens, _ = splits()
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95))
    offsets = torch.arange(CONTEXT + 1)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step)
        starts = torch.randint(len(train_tokens) - CONTEXT - 1, (BATCH_SIZE,), generator=generator)
        windows = train_tokens[starts[:, None] + offsets]
        model.train()
        loss = F.cross_entropy(model(windows[:, :-1]).reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % LOG_EVERY == 0 or step == STEPS - 1):
            log(f"step {step}: train loss {loss.item():.4f}")
    return model


def main(argv: list[str] | None = None) -> None:
    run(__doc__.splitlines()[0], CHECKPOINT, train, evaluate, {
        "model": f"char-transformer-d{D_MODEL}-h{HEADS}-l{LAYERS}-ff{FF}-ctx{CONTEXT}",
        "corpus": ",".join(MODULES),
        "corpus_sha256": corpus_fingerprint(),
        "seed": str(SEED),
        "threads": str(THREADS),
        "steps": str(STEPS),
        "batch_size": str(BATCH_SIZE),
        "lr": str(LR),
    }, argv)


if __name__ == "__main__":
    main()
