"""Measure the README's "Results" tables for the sample models (``make results``).

Usage: ``python -m sample_models.results [--readme README.md] [--json out/results.json]``

Each model's committed checkpoint is compressed at tol 1e-2 with the default options, evaluated
with `hmcompress.evaluate.analysis` (the compressed model runs through the runtime shim) and swept over
tolerances; a model with a calibration loss (the PINN) is also evaluated recalibrated. The tables
replace what lies between the RESULTS markers of the README (written to a temporary file and
renamed); the full figures go to the JSON file.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

from hmcompress.api import compress_checkpoint
from hmcompress.core.build import CompressionOptions
from hmcompress.evaluate import analysis
from hmcompress.evaluate import tables as evaluation_report
from hmcompress.io.writer import atomic_write
from hmcompress.report import tables as report
from hmcompress.train.recalibrate import STEPS, recalibrate, retrain

MODELS = (
    ("Digits classifier (MLP)", "sample_models.classifier"),
    ("Burgers PINN", "sample_models.burgers_pinn"),
    ("Character transformer", "sample_models.char_transformer"),
)
BEGIN, END = "<!-- RESULTS:BEGIN (make results) -->", "<!-- RESULTS:END -->"
TOL = 1e-2


def machine() -> str:
    """CPU model, core count, torch version and threads: what the timings and figures ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} thread"
            f"{'' if threads == 1 else 's'}), Python {platform.python_version()}")


def measure(title: str, module: str, log) -> list[tuple[str, analysis.Evaluation, str]]:
    """Compress ``module``'s checkpoint at TOL and evaluate it with a sweep; a package with a
    ``calibration_loss`` also has that file recalibrated and evaluated (see `recalibrated`).
    Returns (title, evaluation, note) per table."""
    task = analysis.load_task(f"{module}:build")
    package = importlib.import_module(module)

    def progress(message: str) -> None:
        log(f"{module}: {message}")

    with tempfile.TemporaryDirectory(prefix="hmcompress-results-") as tmp:
        compressed = pathlib.Path(tmp) / f"{package.CHECKPOINT.stem}.hm.safetensors"
        progress(f"compress at tol {TOL:g}")
        compress_checkpoint(package.CHECKPOINT, compressed, CompressionOptions(tol=TOL))
        out = [(title, analysis.evaluate_compressed(task, package.CHECKPOINT, compressed,
                                                    sweep_tols=analysis.SWEEP_TOLS, progress=progress), "")]
        calibration_loss = getattr(package, "calibration_loss", None)
        if calibration_loss is not None:
            out.append(recalibrated(title, task, package.CHECKPOINT, compressed, calibration_loss, progress))
        return out


def recalibrated(title: str, task: analysis.ModelTask, checkpoint: pathlib.Path, compressed: pathlib.Path,
                 calibration_loss, progress) -> tuple[str, analysis.Evaluation, str]:
    """`hmcompress recalibrate` applied to ``compressed``, evaluated, with a note on the control:
    the same training of the uncompressed model (how much of the gain is training alone)."""
    output = compressed.with_name(compressed.name.replace(".hm.", ".recalibrated.hm."))
    progress("recalibrate")
    done = recalibrate(task.build(), compressed, calibration_loss, output)
    evaluation = analysis.evaluate_compressed(task, checkpoint, output, progress=progress)
    progress("control (the same training, uncompressed)")
    control = analysis.original_model(task, checkpoint)
    retrain(control, done.tensors, calibration_loss, STEPS)
    value = task.evaluate(control)[evaluation.metric]
    note = (f"Control: the same {STEPS} L-BFGS steps on the same {len(done.tensors)} tensors of the "
            f"*uncompressed* checkpoint give {evaluation.metric} {value:.4g}; recalibrated H-matrix "
            f"/ recalibrated original = {evaluation.metrics_compressed[evaluation.metric] / value:.3g}.")
    return (f"{title}, recalibrated ({done.numbers} passthrough numbers retrained on its calibration loss, "
            f"{done.loss_before:.3g} -> {done.loss_after:.3g})", evaluation, note)


def section(results: list[tuple[str, analysis.Evaluation, str]], elapsed: float) -> str:
    """The Markdown between the README markers."""
    date = datetime.date.today().isoformat()
    lines = [BEGIN, "",
             f"Measured on {date} by `make results` ({elapsed / 60:.1f} min) on {machine()}. "
             f"Each committed sample checkpoint is compressed at tol {TOL:g} (default options: optimal "
             "strategy, auto precision) and loaded through `hmruntime` as a user would; truncated SVD "
             "keeps, per matrix, the smallest rank within the same relative Frobenius tolerance "
             "(factors in float32). Output error and per-layer activation errors are "
             "‖a_H − a‖_F / ‖a‖_F over 64 sample inputs; the NTK is Θ = J Jᵀ over the sample "
             "inputs shown. Ratios are float32 bytes / stored bytes; an SVD ratio of 1 means the "
             "rank within tolerance is above the break-even rank mn/(m+n), so the factors would not "
             "be smaller than the matrix (the SVD metric is still that of the truncated matrices). "
             "A model whose package has a calibration loss (the PINN: its physics loss) is shown a "
             "second time recalibrated: the same file after `hmcompress recalibrate`, which retrains "
             "only the tensors stored exactly (biases, uncompressed layers); its H-matrices and their "
             "bounds are those above.", ""]
    for title, evaluation, note in results:
        lines.append(evaluation_report.markdown(evaluation, title))
        if note:
            lines += [note, ""]
    lines.append(END)
    return "\n".join(lines)


def write_readme(readme: pathlib.Path, text: str) -> None:
    """Replace the marked section (or append it) atomically."""
    old = readme.read_text(encoding="utf-8")
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write(readme, lambda tmp: tmp.write_text(new, encoding="utf-8"), overwrite=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("README.md"))
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("out/results.json"))
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = []
    for title, module in MODELS:
        results += measure(title, module, log)
    elapsed = time.perf_counter() - start
    text = section(results, elapsed)
    write_readme(args.readme, text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "tol": TOL, "models": {title: {**ev.to_json(), "note": note} for title, ev, note in results}}
    args.json.write_text(report.to_json(payload) + "\n", encoding="utf-8")
    print(text)
    log(f"wrote {args.readme} and {args.json} in {elapsed:.0f}s")


if __name__ == "__main__":
    main()
