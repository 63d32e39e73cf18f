"""`hmcompress compare` on every shared checkpoint and sample model: time and outcome.

Per checkpoint: seconds of one `compress` at tol 1e-2 (auto, no file written; the baseline, run
in the same process), of `compare` at tol 1e-2 and with the sweep 1e-1,1e-2,1e-3 (all methods,
matched sizes included), of drawing its pictures, and on how many (layer or total, tolerance)
rows hmcompress (auto) has the fewest bytes among the methods within the tolerance, naming
the others; and the total bytes ratio of hmcompress (auto) and of the best other method within the
tolerance on every layer. Usage: python -m benchmarks.compare [--no-pictures] [NAME_SUBSTRING ...]
"""
from __future__ import annotations

import argparse
import pathlib
import time

from benchmarks.checkpoints import checkpoint_files
from hmcompress.api import compress_checkpoint
from hmcompress.compare import baselines
from hmcompress.compare import comparison as compare
from hmcompress.core.build import CompressionOptions
from hmcompress.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = [1e-2, 1e-1, 1e-3]


def sample_model_files() -> list[pathlib.Path]:
    return sorted((ROOT / "sample_models").glob("*/*.safetensors"))


def _seconds(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-pictures", action="store_true", help="skip timing the pictures")
    parser.add_argument("names", nargs="*", help="only checkpoints whose path contains one of these")
    args = parser.parse_args()
    methods = baselines.registry()
    ratios = " | ".join(f"ratio @{tol:g}" for tol in SWEEP)
    print("| checkpoint | matrices | compress 1e-2 | compare 1e-2 | compare sweep | / compress | pictures "
          f"| {ratios} | hm-auto smallest (rows) | not smallest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in [*checkpoint_files(), *sample_model_files()]:
        if args.names and not any(n in str(path) for n in args.names):
            continue
        label = f"{path.parent.name}/{path.name}"
        base, _ = _seconds(lambda: compress_checkpoint(path, None, CompressionOptions(tol=1e-2), write=False))
        try:
            single, _ = _seconds(lambda: compare.compare_checkpoint(path, SWEEP[:1], methods))
        except UserError as err:  # e.g. no matrix to compress: compare refuses it, as the CLI does
            print(f"| {label} | 0 | {base:.1f}s |" + " - |" * (5 + len(SWEEP)) + f" {err} |", flush=True)
            continue
        sweep, result = _seconds(lambda: compare.compare_checkpoint(path, SWEEP, methods))
        drawn = "-"
        if not args.no_pictures and result.layers:
            from hmcompress.report import plots
            drawn = f"{_seconds(lambda: plots.comparison_pictures(result))[0]:.1f}s"
        beaten = result.not_smallest()
        rows = (len(result.layers) + 1) * len(SWEEP) if result.layers else 0
        others = "; ".join(f"{b['layer'] or 'total'} @{b['tol']:g}: {b['smallest']} {b['bytes']} B "
                           f"< {b['reference_bytes']} B" for b in beaten) or "-"
        print(f"| {label} | {len(result.layers)} | {base:.1f}s | {single:.1f}s | {sweep:.1f}s | "
              f"{sweep / base:.1f}x | {drawn} | {' | '.join(_ratios(result, tol) for tol in SWEEP)} | "
              f"{rows - len(beaten)}/{rows} | {others} |", flush=True)


def _ratios(result: compare.Comparison, tol: float) -> str:
    """Total bytes ratio of hm-auto and of the best other method within the tolerance on every layer."""
    if not result.layers:
        return "-"
    totals = result.totals(tol)
    others = {n: t for n, t in totals.items() if n != baselines.REFERENCE and t.layers_within == t.layers}
    best = min(others, key=lambda n: others[n].nbytes)
    return f"{totals[baselines.REFERENCE].ratio:.2f} ({best} {others[best].ratio:.2f})"


if __name__ == "__main__":
    main()
