"""`make bench`: every benchmark in turn, each printing a Markdown table of ratios against a
baseline run in the same process (absolute times are noise on shared machines).

Usage: python -m benchmarks [--quick]   (--quick: smaller sizes where a benchmark offers them)
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import torch

MODULES = ("compression", "entropy", "uniform", "runtime", "training", "models", "scale", "checkpoints", "compare", "peers",
           "budget")
QUICK = {"compression", "entropy", "runtime", "training", "peers"}  # modules with a --quick flag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes where offered")
    args = parser.parse_args()
    print(f"hmcompress benchmarks: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads\n")
    for name in MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        sys.argv = [f"benchmarks.{name}", *(["--quick"] if args.quick and name in QUICK else [])]
        print(f"## {name}\n", flush=True)
        module.main()
        print(flush=True)


if __name__ == "__main__":
    main()
