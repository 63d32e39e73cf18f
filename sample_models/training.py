"""What the sample models' training scripts share: determinism, the command line, saving."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

Log = Callable[[str], None]


def make_deterministic(seed: int, threads: int) -> torch.Generator:
    """Seed torch, fix the thread count (another count may round differently) and enforce
    deterministic algorithms; returns a generator seeded with ``seed`` for data order."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def run(description: str, checkpoint: Path, train: Callable[[Log | None], nn.Module],
        evaluate: Callable[[nn.Module], dict], metadata: dict[str, str],
        argv: list[str] | None = None) -> None:
    """``[--out PATH] [--quiet]``: train, evaluate, save the state dict as safetensors with the
    metrics and ``metadata`` (hyperparameters) in its header, print one summary line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=checkpoint, help="checkpoint path")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train(None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - start
    result = evaluate(model)
    header = {"format": "pt", **{key: f"{value:.6e}" for key, value in result.items()}, **metadata,
              "torch": torch.__version__, "python": sys.version.split()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(args.out), metadata=header)
    os.chmod(args.out, 0o644)  # safetensors creates files readable by their owner only
    summary = ", ".join(f"{key} {value:.4g}" for key, value in result.items())
    print(f"{summary}; trained in {elapsed:.0f}s; wrote {args.out}")
