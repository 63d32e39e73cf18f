"""Command line: thin wiring from options to `hmcompress.api`, one clear line per user error.

Exit codes: 0 ok, 1 a quality check failed (verify, or a --max-error/--min-ratio gate),
2 bad input or usage.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import warnings
from collections.abc import Callable
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hmcompress import api
from hmcompress.compare import baselines
from hmcompress.compare import comparison as compare
from hmcompress.report import tables as report
from hmcompress.train import recalibrate as recalibration
from hmcompress.core.build import CompressionOptions
from hmcompress.io.checkpoint import Selection
from hmcompress.errors import USER_ERRORS, OptionError, OutputExists, UserError
from hmcompress.core.verdicts import Gates

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Error-bounded hierarchical-matrix compression of checkpoints.")
# Not on a terminal (pipes, CI logs) the table keeps its width instead of wrapping at 80 columns.
stdout = Console(width=None if sys.stdout.isatty() else 240)
stderr = Console(stderr=True)
_debug = {"on": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _debug["on"] = debug


@contextlib.contextmanager
def _progress(enabled: bool, label: str):
    """A progress callback: a rich bar on a terminal, plain lines on stderr otherwise."""
    if not enabled:
        yield None
        return
    if not stderr.is_terminal:
        yield lambda done, total, name: stderr.print(f"[{done + 1}/{total}] {label}: {name}",
                                                     markup=False, highlight=False)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{label}: {name}")
        yield update


@app.command()
def compress(
    models: list[pathlib.Path] = typer.Argument(..., help="Checkpoint files or sharded directories."),
    tol: float = typer.Option(1e-2, "--tol", help="Relative Frobenius tolerance per matrix."),
    absolute: bool = typer.Option(False, "--abs", help="Make --tol an absolute Frobenius error."),
    strategy: str = typer.Option("optimal", help="optimal (default) or paper (the seed's algorithm)."),
    precision: str = typer.Option("auto", help="auto (mixed storage precisions) or keep (source dtype)."),
    leaf: int = typer.Option(32, help="Smallest block side the quad-tree splits down to."),
    min_size: int = typer.Option(64, help="Compress only matrices with both sides >= this."),
    include: list[str] = typer.Option([], help="Glob on tensor names to compress (repeatable)."),
    exclude: list[str] = typer.Option([], help="Glob on tensor names to leave alone (repeatable)."),
    conv: bool = typer.Option(False, help="Also compress conv kernels (as out x in*k*k)."),
    output: Optional[pathlib.Path] = typer.Option(None, "-o", "--output", help="Output file (one input)."),
    out_dir: Optional[pathlib.Path] = typer.Option(None, "--out-dir", help="Output directory (many inputs)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Gate: exit 1 (writing nothing) if the "
                                              "largest relative Frobenius error of a compressed matrix exceeds this."),
    min_ratio: Optional[float] = typer.Option(None, "--min-ratio", help="Gate: exit 1 (writing nothing) if the "
                                              "whole checkpoint's bytes ratio (all tensors, before/after) is below this."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Write the output even when a gate fails."),
    passthrough_nonfinite: bool = typer.Option(False, "--passthrough-nonfinite", help="Copy matrices holding "
                                               "NaN/Inf unchanged instead of refusing the checkpoint."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Compress in this many processes "
                                          "(default: $HMCOMPRESS_WORKERS, else one per 16 MiB of matrices up to "
                                          "one per core); the output is the same for any number."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the matrices an interrupted run of the same "
                                "output already compressed (kept beside the output until it is written)."),
    device: str = typer.Option("cpu", "--device", help="Where the factorizations run: cpu or cuda[:N]."),
) -> None:
    """Compress every eligible weight matrix into an H-matrix within --tol."""
    if output and len(models) > 1:
        raise UserError("-o/--output takes one input; use --out-dir for several")
    options = CompressionOptions(tol=tol, absolute=absolute, strategy=strategy, precision=precision, leaf=leaf,
                                 device=device)
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv,
                          passthrough_nonfinite=passthrough_nonfinite)
    gates = Gates(max_error, min_ratio) if max_error is not None or min_ratio is not None else None
    targets = [output or api.default_output(model, out_dir) for model in models]
    _refuse_duplicate_outputs(models, targets)
    results = []
    for model, target in zip(models, targets):
        try:
            with _progress(not quiet, str(model)) as progress:
                result = api.compress_checkpoint(model, target, options, selection, overwrite=force,
                                                 progress=progress, gates=gates, keep_failed=keep_failed,
                                                 workers=workers, resume=resume)
        except KeyboardInterrupt:
            stderr.print(f"hmcompress: interrupted: nothing written to {target}; the matrices already "
                         "compressed are kept, run the same command with --resume to go on", markup=False,
                         highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        results.append(result)
        if resume and not quiet:
            compressed = sum(layer.compressed for layer in result.layers)
            stderr.print(f"{model}: resumed {len(result.reused)} of {compressed} matrices", markup=False,
                         highlight=False)
        if not json_out:
            report.print_table(result.layers, stdout, title=f"{model} -> {result.output or 'nothing written'}")
        for failure in result.failures:
            stderr.print(f"hmcompress: {model}: quality gate failed: {failure}"
                         f"{'' if result.output else '; nothing written'}", markup=False, highlight=False, soft_wrap=True)
    if json_out:
        payload = [{"ok": not r.failures, "source": str(r.source), "output": str(r.output) if r.output else None,
                    "gate_failures": r.failures, "options": r.options,
                    "layers": [s.to_json() for s in r.layers], "totals": r.totals()} for r in results]
        stdout.print_json(report.to_json(payload if len(payload) > 1 else payload[0]))
    if any(r.failures for r in results):
        raise typer.Exit(1)


def _refuse_duplicate_outputs(models: list[pathlib.Path], targets: list[pathlib.Path]) -> None:
    """Two inputs may not write the same output (e.g. model.pt and model.safetensors)."""
    seen: dict[pathlib.Path, pathlib.Path] = {}
    for model, target in zip(models, targets):
        key = target.resolve()
        if key in seen:
            raise UserError(f"{model}: would write {target}, as {seen[key]} does; compress them separately")
        seen[key] = model


@app.command("report")
def report_cmd(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    original: Optional[pathlib.Path] = typer.Option(None, help="Also re-measure against the original."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    html_out: Optional[pathlib.Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page "
                                                    "(table and pictures)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing HTML page."),
) -> None:
    """Per-layer errors, bounds and compression ratios stored in a compressed file."""
    if html_out:
        _check_picture_outputs(None, html_out, force)
    meta, layers = api.stats_from_file(file)
    if html_out:
        _write_report_page(file, meta, layers, html_out, force)
    checks = api.verify(file, original) if original else []
    if json_out:
        payload = {"ok": all(c.ok for c in checks), "file": str(file), "options": meta.get("options", {}),
                   "layers": [s.to_json() for s in layers], "totals": api.totals(layers)}
        if checks:
            payload["verify"] = [c.__dict__ for c in checks]
        if "recalibrated" in meta:
            payload["recalibrated"] = meta["recalibrated"]
        stdout.print_json(report.to_json(payload))
    else:
        if markdown:
            sys.stdout.write(report.markdown(layers, title=str(file.name)))
        else:
            report.print_table(layers, stdout, title=str(file))
        if "recalibrated" in meta:
            stdout.print(recalibration.describe(meta["recalibrated"]), markup=False, highlight=False, soft_wrap=True)
    _print_checks(checks)


def _write_report_page(file: pathlib.Path, meta: dict, layers: list, html_out: pathlib.Path, force: bool) -> None:
    from hmcompress.runtime import read_file

    matrices = read_file(file).matrices
    stats = {name: info["stats"] for name, info in meta["matrices"].items()}
    relative = not meta.get("options", {}).get("absolute", False)
    _write_pictures(None, html_out, force, lambda plots: plots.file_pictures(matrices, stats, relative),
                    lambda pages, pictures: pages.file_page(file.name, meta.get("options", {}), layers, pictures))


@app.command("verify")
def verify_cmd(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    original: pathlib.Path = typer.Option(..., help="The checkpoint it was made from."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Re-measure every matrix against the original; exit 1 if any error exceeds its bound."""
    checks = api.verify(file, original)
    if json_out:
        stdout.print_json(report.to_json({"ok": all(c.ok for c in checks), "matrices": [c.__dict__ for c in checks]}))
    else:
        for c in checks:
            status = "ok" if c.ok else "FAILED"
            stdout.print(f"{status:6} {c.name}: measured {c.measured_error:.6g} <= budget {c.budget:.6g} "
                         f"(recorded {c.recorded_error:.6g})", markup=False, highlight=False)
            for problem in c.problems:
                stdout.print(f"       {problem}", markup=False, highlight=False)
    _print_checks(checks)


def _print_checks(checks: list) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        stderr.print(f"hmcompress: {len(failed)} matrices break a recorded bound: {failed[0].name}: "
                     f"{failed[0].problems[0] if failed[0].problems else 'error above its bound'}",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("compare")
def compare_cmd(
    model: pathlib.Path = typer.Argument(..., help="A checkpoint file or sharded directory."),
    tol: float = typer.Option(1e-2, "--tol", help="Relative Frobenius tolerance (the pictures use this one)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="More tolerances, comma-separated: 1e-1,1e-2,1e-3."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated subset of the methods "
                                          "(default all; hm-auto, the reference, always runs)."),
    leaf: int = typer.Option(32, help="Smallest block side of the H-matrix methods."),
    min_size: int = typer.Option(64, help="Compare only matrices with both sides >= this."),
    include: list[str] = typer.Option([], help="Glob on tensor names to compare (repeatable)."),
    exclude: list[str] = typer.Option([], help="Glob on tensor names to leave out (repeatable)."),
    conv: bool = typer.Option(False, help="Also compare conv kernels (as out x in*k*k)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout (docs/COMPARE.md)."),
    plot: Optional[pathlib.Path] = typer.Option(None, "--plot", help="Write PNG pictures into this directory."),
    html_out: Optional[pathlib.Path] = typer.Option(None, "--html", help="Write one self-contained HTML page."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing pictures and page."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help="A model package's factory, "
                                                "e.g. sample_models.classifier:build: also each method's "
                                                "task metric at --tol."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """hmcompress beside truncated SVD, pruning, int8/int4 quantization and the paper's algorithm:
    bytes and measured error per layer at each tolerance, and errors at a matched size."""
    tols = compare.tolerances(tol, sweep)
    chosen = baselines.select(methods, leaf)
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv)
    if plot or html_out:
        _check_picture_outputs(plot, html_out, force)
    task = None
    if model_factory:
        from hmcompress.evaluate import analysis

        if str(pathlib.Path.cwd()) not in sys.path:
            sys.path.insert(0, str(pathlib.Path.cwd()))  # the user's model package, as `python -m` finds it
        task = analysis.load_task(model_factory)
    with _progress(not quiet, f"compare {model}") as progress:
        result = compare.compare_checkpoint(model, tols, chosen, selection, leaf, progress, task)
    _write_pictures(plot, html_out, force, lambda plots: plots.comparison_pictures(result),
                    lambda pages, pictures: pages.comparison_page(result, pictures))
    if json_out:
        stdout.print_json(report.to_json(result.to_json()))
        return
    for table in compare.tables(result):
        _print_text_table(table)


def _check_picture_outputs(plot: Optional[pathlib.Path], html_out: Optional[pathlib.Path], force: bool) -> None:
    """Before any work: matplotlib is there, and the outputs can be written."""
    from hmcompress.report.plots import require_matplotlib

    require_matplotlib()
    if html_out and html_out.exists() and not force:
        raise UserError(f"{html_out}: exists (use --force to overwrite)")
    if plot and plot.exists() and not plot.is_dir():
        raise UserError(f"{plot}: is not a directory")


def _write_pictures(plot: Optional[pathlib.Path], html_out: Optional[pathlib.Path], force: bool,
                    draw: Callable, page: Callable) -> None:
    """Draw the pictures once; write them into ``plot`` and/or embed them in the ``html_out`` page.

    Every file goes through a temporary file and a rename; existing pictures are refused before
    any is written (unless ``force``).
    """
    from hmcompress.report import pages
    from hmcompress.report import plots
    from hmcompress.io.writer import atomic_write

    if not (plot or html_out):
        return
    stderr.print("drawing pictures", markup=False, highlight=False)
    pictures = draw(plots)
    if plot:
        clash = [name for name in pictures if (plot / name).exists()]
        if clash and not force:
            raise UserError(f"{plot / clash[0]}: exists (use --force to overwrite)")
        plot.mkdir(parents=True, exist_ok=True)
        for name, png in pictures.items():
            atomic_write(plot / name, lambda tmp, png=png: tmp.write_bytes(png), overwrite=force)
        stderr.print(f"wrote {len(pictures)} pictures to {plot}", markup=False, highlight=False)
    if html_out:
        text = page(pages, pictures)
        atomic_write(html_out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=force)
        stderr.print(f"wrote {html_out}", markup=False, highlight=False)


def _print_text_table(text_table: compare.TextTable) -> None:
    from rich.table import Table

    table = Table(title=text_table.title)
    for header in text_table.headers:
        table.add_column(header, overflow="fold")
    for row in text_table.rows:
        table.add_row(*row)
    stdout.print(table)
    for note in text_table.notes:
        stdout.print(note, markup=False, highlight=False)


@app.command()
def decompress(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="Dense safetensors file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
) -> None:
    """Write the dense checkpoint (original names, shapes and dtypes) as safetensors."""
    _check_derived_output(output, file, force)
    count = api.decompress(file, output, overwrite=force)
    stderr.print(f"wrote {output} ({count} tensors)", markup=False, highlight=False)


@app.command("inspect")
def inspect_cmd(
    model: pathlib.Path = typer.Argument(..., help="A checkpoint file or sharded directory."),
    min_size: int = typer.Option(64, help="Compress only matrices with both sides >= this."),
    include: list[str] = typer.Option([], help="Glob on tensor names to compress."),
    exclude: list[str] = typer.Option([], help="Glob on tensor names to leave alone."),
    conv: bool = typer.Option(False, help="Also compress conv kernels."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List tensors, shapes, dtypes, sizes and what would be compressed."""
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv)
    ckpt, rows = api.inspect(model, selection)
    if json_out:
        stdout.print_json(report.to_json({"ok": True, "file": str(model), "kind": ckpt.kind, "tensors": rows}))
        return
    from rich.table import Table
    table = Table(title=f"{model} ({ckpt.kind})")
    for col in ("name", "shape", "dtype", "bytes", "action"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], str(r["bytes"]),
                      "compress" if r["compress"] else f"passthrough: {r['reason']}")
    stdout.print(table)


@app.command("evaluate")
def evaluate_cmd(
    model_factory: str = typer.Argument(..., help="The model's factory, e.g. sample_models.classifier:build."),
    checkpoint: pathlib.Path = typer.Argument(..., help="The original checkpoint."),
    compressed: pathlib.Path = typer.Option(..., "--compressed", help="Its compressed .hm.safetensors file."),
    samples: int = typer.Option(64, help="Sample inputs for the output error and error propagation."),
    ntk_samples: int = typer.Option(32, help="Sample inputs for the NTK (fewer if J would pass 512 MiB)."),
    sweep: bool = typer.Option(False, "--sweep", help="Also compress at tol 1e-1 .. 1e-3 and score each."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Task metric, output error, NTK and per-layer error propagation: compressed vs original
    (and vs truncated SVD at the same tolerance); the compressed model runs through hmruntime."""
    from hmcompress.evaluate import analysis
    from hmcompress.evaluate import tables as evaluation_report

    if samples < 1 or ntk_samples < 2:
        raise UserError("--samples must be >= 1 and --ntk-samples >= 2")
    _import_from_cwd()
    task = analysis.load_task(model_factory)
    log = None if quiet else _log_lines("evaluate")
    result = analysis.evaluate_compressed(task, checkpoint, compressed, samples, ntk_samples,
                                          analysis.SWEEP_TOLS if sweep else (), log)
    if json_out:
        stdout.print_json(report.to_json({"ok": True, **result.to_json()}))
    else:
        evaluation_report.print_evaluation(result, stdout)


@app.command("recalibrate")
def recalibrate_cmd(
    model_factory: str = typer.Argument(..., help="The model's factory, e.g. sample_models.burgers_pinn:build; "
                                        "its module must offer calibration_loss(model)."),
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="The recalibrated .hm.safetensors file to write."),
    steps: int = typer.Option(recalibration.STEPS, help="L-BFGS iterations."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Retrain the tensors the file stores exactly (biases, uncompressed layers) on the model's
    calibration loss; the H-matrices, their errors and bounds stay as they are."""
    from hmcompress.evaluate import analysis

    _check_derived_output(output, file, force)
    _import_from_cwd()
    _module, hooks = analysis.load_hooks(model_factory, ("calibration_loss",))
    log = None if quiet else _log_lines("recalibrate")
    result = recalibration.recalibrate(hooks["factory"](), file, hooks["calibration_loss"], output, steps=steps,
                                       overwrite=force, progress=log)
    if json_out:
        stdout.print_json(report.to_json({"ok": True, **result.to_json()}))
    else:
        stdout.print(f"{result.output}: retrained {len(result.tensors)} tensors ({result.numbers} numbers); "
                     f"loss {result.loss_before:.6g} -> {result.loss_after:.6g}", markup=False, highlight=False)


def _check_derived_output(output: pathlib.Path, file: pathlib.Path, force: bool) -> None:
    """An output made from ``file`` never replaces it, and replaces another file only with --force."""
    if api.is_input(output, file):
        raise UserError(f"{output}: refusing to overwrite the input file")
    if output.exists() and not force:
        raise UserError(f"{output}: exists (use --force to overwrite)")


def _log_lines(command: str) -> Callable[[str], None]:
    """Progress messages as plain lines on stderr, prefixed with the command."""
    return lambda message: stderr.print(f"{command}: {message}", markup=False, highlight=False)


def _import_from_cwd() -> None:
    """Let a factory spec name the user's own package in the working directory, as `python -m` would."""
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))


# The library names options as its parameters do; the command line shows the flags.
FLAGS = {"tol": "--tol", "strategy": "--strategy", "precision": "--precision", "leaf": "--leaf",
         "device": "--device", "max_error": "--max-error", "min_ratio": "--min-ratio", "sweep": "--sweep",
         "methods": "--methods"}


def _in_cli_terms(exc: Exception) -> str:
    """A user error's message, with the library's option names turned into the flags."""
    if isinstance(exc, OptionError):
        return f"{FLAGS.get(exc.option, exc.option)} {exc.problem}"
    if isinstance(exc, OutputExists):
        return f"{exc.path}: exists (use --force to overwrite)"
    return str(exc)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (with --json,
    also ``{"ok": false, "error": ...}`` on stdout); each warning becomes one line on stderr."""
    json_out = "--json" in sys.argv[1:]
    warnings.showwarning = _warning_line
    try:
        app()
    except USER_ERRORS as exc:
        if _debug["on"]:
            raise
        message = " ".join(_in_cli_terms(exc).splitlines())
        stderr.print(f"hmcompress: error: {message}", markup=False, highlight=False, soft_wrap=True)
        if json_out:
            sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 2 and json_out:  # a usage error, explained on stderr by typer
            sys.stdout.write(json.dumps({"ok": False, "error": "invalid command line (see stderr)"}) + "\n")
        raise


def _warning_line(message, _category, _filename, _lineno, _file=None, _line=None) -> None:
    text = " ".join(str(message).splitlines())
    stderr.print(f"hmcompress: warning: {text}", markup=False, highlight=False, soft_wrap=True)
