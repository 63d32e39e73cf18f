"""Command line: thin wiring from options to `hmcompress.api`, one clear line per user error.

Exit codes: 0 ok, 1 a quality check failed (verify, or a --max-error/--min-ratio gate),
2 bad input or usage, 130 interrupted. The library (and so torch) is imported inside each
command, so that ``--help`` and ``--version`` answer at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Literal, Optional

import typer
import typer.core
from rich.console import Console

from hmcompress import __version__
from hmcompress.errors import USER_CODE_FAILURES, OptionError, OutputExists, UserError
from hmcompress.report.text import print_line

try:  # typer 0.2x vendors its click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer: click itself
    from click import exceptions as click_exceptions


class _BareFlags:
    """Flags (--force, --help, --install-completion, ...) show no value placeholder in --help."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_BareFlags, typer.core.TyperCommand):
    pass


class _Group(_BareFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Error-bounded hierarchical-matrix compression of checkpoints.",
                  epilog="Start with: hmcompress compress model.pt --tol 1e-2   (then: hmcompress report "
                         "model.hm.safetensors). Shell completion: hmcompress --install-completion.")
PIPE_WIDTH = 240  # not on a terminal (pipes, CI logs), tables keep this width unless COLUMNS says otherwise
_debug = {"on": False}


def _console(stderr: bool = False) -> Console:
    """A console for this call: COLUMNS wins, then the terminal's width, then PIPE_WIDTH."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "")
    tty = stream.isatty()
    width = int(columns) if columns.isdigit() else (None if tty else PIPE_WIDTH)
    # Names are data: no markup, no :emoji: codes.
    return Console(file=stream, width=width, force_terminal=None if tty else False, markup=False, emoji=False)


def _say(text: str) -> None:
    """A line of progress or logging on stderr."""
    print_line(_console(stderr=True), text)


def _out(text: str) -> None:
    """A line of data on stdout."""
    print_line(_console(), text)


def _json(payload: dict) -> None:
    from hmcompress.report.tables import to_json

    sys.stdout.write(to_json(payload) + "\n")


def flag(*names: str, help: str) -> bool:  # noqa: A002 - typer's parameter name
    """A boolean option, off unless given."""
    return typer.Option(False, *names, help=help)


def _version(value: bool) -> None:
    if value:
        _out(f"hmcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = flag("--debug", help="Show tracebacks for errors (also accepted after the command)."),
          _version_flag: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                             help="Print the version and exit.")) -> None:
    _debug["on"] = _debug["on"] or debug


class _Bar:
    """Progress on stderr: a rich bar on a terminal (total, percentage, throughput, ETA from the
    start), plain lines otherwise, nothing with --quiet."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.console = _console(stderr=True)
        self.bar = self.task = None

    def __enter__(self) -> "_Bar":
        if self.enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=None, rate="")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)

    def update(self, done: int, total: int, detail: str | None, rate: str = "", eta: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, rate=rate)
        elif detail is not None:
            percent = f" {100 * done / total:.0f}%" if total else ""
            extras = ", ".join(part for part in (rate, eta and f"ETA {eta}") if part)
            print_line(self.console, f"[{done}/{total}{percent}] {self.label}: {detail}"
                       + (f" ({extras})" if extras else ""))

    def compression(self, started: float) -> Callable:
        """For `api.compress_checkpoint`: matrices, bytes per second and the time left."""
        import time

        def report(state) -> None:
            elapsed = time.monotonic() - started
            rate = state.done_bytes / elapsed / 1e6 if elapsed > 0 and state.done_bytes else 0.0
            left = (state.total_bytes - state.done_bytes) / (rate * 1e6) if rate else None
            eta = f"{int(left) // 60}:{int(left) % 60:02d}" if left is not None else ""
            detail = f"{state.finished} done" if state.finished else ("starting" if state.total else None)
            self.update(state.done, state.total, detail, f"{rate:.1f} MB/s" if rate else "", eta)
        return report


@app.command(cls=_Command, epilog="Examples: hmcompress compress model.pt --tol 1e-2 | hmcompress compress ckpts/*.safetensors "
                    "--tol 1e-2 --out-dir out --json | hmcompress compress model.pt --max-error 0.01 --min-ratio 3")
def compress(
    models: list[pathlib.Path] = typer.Argument(..., help="Checkpoint files or sharded directories.",
                                                metavar="CHECKPOINT..."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Relative Frobenius tolerance per matrix "
                                        "(default 1e-2; with --activations, on each layer's output)."),
    absolute: bool = flag("--abs", help="Make --tol an absolute Frobenius error."),
    strategy: Literal["optimal", "paper"] = typer.Option("optimal", help="optimal: fewest bytes within --tol; "
                                                          "paper: the seed paper's algorithm."),
    precision: Literal["auto", "keep"] = typer.Option("auto", help="auto: mixed storage precisions; keep: "
                                                      "the source dtype only."),
    leaf: int = typer.Option(32, min=1, help="Smallest block side the quad-tree splits down to."),
    min_size: int = typer.Option(64, min=0, help="Compress only matrices of at least this squared entries "
                                 "(64: 4096 entries, e.g. 64x64 or 16x256)."),
    include: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to compress (repeatable)."),
    exclude: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to leave alone (repeatable)."),
    conv: bool = typer.Option(True, "--conv/--no-conv", help="Conv kernels as out x in*k*k matrices (pointwise "
                              "convs are plain matrices)."),
    output: Optional[pathlib.Path] = typer.Option(None, "-o", "--output", help="Output file (one input)."),
    out_dir: Optional[pathlib.Path] = typer.Option(None, "--out-dir", help="Output directory (many inputs; "
                                                   "created if missing)."),
    force: bool = flag("--force", help="Overwrite existing outputs."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
    quiet: bool = flag("--quiet", "-q", help="No progress on stderr."),
    wide: bool = flag("--wide", help="Every column of the table, whatever the terminal's width."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Gate: exit 1 (writing nothing) if the "
                                              "largest relative Frobenius error of a compressed matrix exceeds this."),
    min_ratio: Optional[float] = typer.Option(None, "--min-ratio", help="Gate: exit 1 (writing nothing) if the "
                                              "whole checkpoint's bytes ratio (all tensors, before/after) is below this."),
    keep_failed: bool = flag("--keep-failed", help="Write the output even when a gate fails."),
    passthrough_nonfinite: bool = flag("--passthrough-nonfinite", help="Copy matrices holding NaN/Inf unchanged "
                                       "instead of refusing the checkpoint."),
    drop_optimizer: bool = flag("--drop-optimizer", help="Leave optimizer state out of the output (a training "
                                "checkpoint's; by default it passes through uncompressed)."),
    model_only: bool = flag("--model-only", help="Keep the model's state dict alone, under the bare model's names "
                            "(a training checkpoint's {'model': ..., 'optimizer': ...} -> what model.state_dict() "
                            "holds): implies --drop-optimizer."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Compress in this many processes "
                                          "(default: $HMCOMPRESS_WORKERS, else one per 16 MiB of matrices up to "
                                          "one per core); the output is the same for any number."),
    resume: bool = flag("--resume", help="Reuse the matrices an interrupted run of the same output already "
                        "compressed (kept beside the output until it is written)."),
    device: str = typer.Option("cpu", "--device", help="Where the factorizations run: cpu or cuda[:N]."),
    engine: Literal["local", "ray"] = typer.Option("local", "--engine", help="local: worker processes here; ray: "
                                                   "Ray tasks (pip install 'hmcompress[ray]'); the same file."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: the cluster to join "
                                          "(host:port, or auto); by default a local one for this run."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Write shards of at most this "
                                                 "size (e.g. 5GB) and an index, as Hugging Face does."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help="A model package's factory, e.g. "
                                                "sample_models.classifier:build: also run the original and the "
                                                "compressed model on its sample inputs and print the difference."),
    activations: Optional[pathlib.Path] = typer.Option(None, "--activations", help="A stats file of hmcompress "
                                                       "calibrate: --tol bounds each layer's output error on the "
                                                       "calibration inputs, ||(W-H)X|| <= tol ||WX||, instead of "
                                                       "its weight error."),
    model_tol: Optional[float] = typer.Option(None, "--model-tol", help="Instead of --tol: per-layer tolerances "
                                              "chosen for the fewest bytes while the whole model's relative output "
                                              "error on the calibration data stays within this, measured on the "
                                              "file as loaded (needs --model-factory; best with --activations)."),
    data: Optional[str] = typer.Option(None, "--data", help="With --model-tol: the calibration data hook "
                                       "(module:function; default: the factory module's calibration_batches)."),
) -> None:
    """Compress every eligible weight matrix into an H-matrix within --tol; writes MODEL.hm.safetensors
    and hmruntime.py beside it, and prints the per-layer report."""
    import time

    from hmcompress import api
    from hmcompress.core.build import CompressionOptions
    from hmcompress.core.verdicts import Gates
    from hmcompress.io.checkpoint import Selection
    from hmcompress.report import tables

    if output and len(models) > 1:
        raise UserError("-o/--output takes one input; use --out-dir for several")
    if address is not None and engine != "ray":
        raise UserError("--address needs --engine ray")
    if engine == "ray":
        from hmcompress.io import ray_engine

        ray_engine.require_ray()
    from hmcompress.io.writer import parse_size

    max_shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    if model_tol is not None:
        _refuse_with_model_tol(models, model_factory, tol=tol, absolute=absolute, max_error=max_error,
                               min_ratio=min_ratio, resume=resume, engine=engine != "local",
                               max_shard_size=max_shard_size)
    elif data is not None:
        raise UserError("--data needs --model-tol (calibrate takes its own --data)")
    options = CompressionOptions(tol=1e-2 if tol is None else tol, absolute=absolute, strategy=strategy,
                                 precision=precision, leaf=leaf, device=device)
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv,
                          passthrough_nonfinite=passthrough_nonfinite, drop_optimizer=drop_optimizer,
                          model_only=model_only)
    gates = Gates(max_error, min_ratio) if max_error is not None or min_ratio is not None else None
    task = _model_task(model_factory) if model_factory and model_tol is None else None
    if out_dir is not None and not output:
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir}: --out-dir is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    targets = [output or api.default_output(model, out_dir) for model in models]
    _refuse_duplicate_outputs(models, targets)
    if len(models) > 1:  # a batch checks every input and output before it writes any
        from hmcompress.io.checkpoint import open_checkpoint

        for model, target in zip(models, targets):
            open_checkpoint(model)
            api.check_output(target, force, model, activations, beside_shim=True)
    results = []
    for model, target in zip(models, targets):
        budget = None
        try:
            if model_tol is not None:
                result, budget = _compress_to_model_tol(model, target, model_tol, model_factory, data, options,
                                                        selection, activations, force, workers, quiet)
            else:
                with _Bar(str(model), not quiet) as bar:
                    result = api.compress_checkpoint(model, target, options, selection, overwrite=force,
                                                     progress=bar.compression(time.monotonic()), gates=gates,
                                                     keep_failed=keep_failed, workers=workers, resume=resume,
                                                     engine=engine, address=address,
                                                     max_shard_bytes=max_shard_bytes, activations=activations)
        except KeyboardInterrupt as interrupt:  # api.Interrupted says what was kept, and where
            message = f"interrupted: {interrupt or f'nothing written to {target}'}"
            _say(f"hmcompress: {message}")
            if json_out:  # one document, always
                sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
            raise typer.Exit(130) from None
        check = None
        if task is not None and result.output is not None:
            from hmcompress.evaluate import analysis

            check = analysis.functional_check(task, model, result.output, result.kept.names if result.kept else None)
        results.append((result, check, budget))
        if resume and not quiet:
            compressed = sum(layer.compressed for layer in result.layers)
            _say(f"{model}: resumed {len(result.reused)} of {compressed} matrices")
        if not json_out:
            tables.print_table(result.layers, _console(), title=f"{model} -> {result.output or 'nothing written'}",
                               wide=wide)
            for note in [*result.notes(), *([check.line()] if check else []), *([budget.line()] if budget else [])]:
                _out(note)
        for failure in result.failures:
            _say(f"hmcompress: {model}: quality gate failed: {failure}{'' if result.output else '; nothing written'}")
    if json_out:
        _json({"ok": not any(r.failures for r, _check, _budget in results),
               "results": [{**r.to_json(), **({"model_check": c.to_json()} if c else {}),
                            **({"model_tol": b.to_json()} if b else {})} for r, c, b in results]})
    if any(r.failures for r, _check, _budget in results):
        raise typer.Exit(1)


def _refuse_with_model_tol(models: list[pathlib.Path], model_factory: Optional[str], **given: object) -> None:
    """--model-tol chooses every layer's tolerance and measures the model: one input, a factory,
    and none of the options that would contradict it."""
    if model_factory is None:
        raise UserError("--model-tol needs --model-factory (the model whose output it bounds)")
    if len(models) > 1:
        raise UserError("--model-tol takes one checkpoint")
    flags = {"tol": "--tol", "absolute": "--abs", "max_error": "--max-error", "min_ratio": "--min-ratio",
             "resume": "--resume", "engine": "--engine ray", "max_shard_size": "--max-shard-size"}
    clash = [flags[key] for key, value in given.items() if value not in (None, False)]
    if clash:
        raise UserError(f"--model-tol and {clash[0]} exclude each other")


def _compress_to_model_tol(model: pathlib.Path, target: pathlib.Path, model_tol: float, factory: str,
                           data: Optional[str], options, selection, activations: Optional[pathlib.Path],
                           force: bool, workers: Optional[int], quiet: bool):
    """`evaluate.budget.compress_to_model_tol` for one checkpoint, its steps logged on stderr."""
    from hmcompress.calibrate import load_data_hook
    from hmcompress.evaluate import analysis, budget

    _import_from_cwd()
    task = analysis.factory_task(factory)
    data_spec, hook = load_data_hook(factory, data)
    try:
        batches = hook()
    except USER_CODE_FAILURES as err:  # the user's code: one line
        raise UserError(" ".join(f"{data_spec}: raised {type(err).__name__}: {err}".split())) from err
    log = (lambda _message: None) if quiet else _log_lines(f"compress {model}")
    return budget.compress_to_model_tol(model, target, model_tol, task, batches, data_spec, options, selection,
                                        activations, overwrite=force, workers=workers, log=log)


def _refuse_duplicate_outputs(models: list[pathlib.Path], targets: list[pathlib.Path]) -> None:
    """Two inputs may not write the same output (e.g. model.pt and model.safetensors)."""
    seen: dict[pathlib.Path, pathlib.Path] = {}
    for model, target in zip(models, targets):
        key = target.resolve()
        if key in seen:
            raise UserError(f"{model}: would write {target}, as {seen[key]} does; compress them separately")
        seen[key] = model


@app.command("report", cls=_Command, epilog="Examples: hmcompress report model.hm.safetensors | hmcompress report "
                              "model.hm.safetensors --markdown >> $GITHUB_STEP_SUMMARY | hmcompress report "
                              "model.hm.safetensors --html report.html")
def report_cmd(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file (sharded: its directory or index)."),
    original: Optional[pathlib.Path] = typer.Option(None, help="Also re-measure against the original."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
    markdown: bool = flag("--markdown", help="Print a Markdown table (for a pull request or job summary)."),
    html_out: Optional[pathlib.Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page "
                                                    "(table and pictures)."),
    force: bool = flag("--force", help="Overwrite an existing HTML page."),
    wide: bool = flag("--wide", help="Every column of the table, whatever the terminal's width."),
) -> None:
    """Per-layer errors, bounds and compression ratios stored in a compressed file (nothing is
    recomputed unless --original is given)."""
    from hmcompress import api
    from hmcompress.report import tables
    from hmcompress.train import recalibrate as recalibration

    if html_out:
        _check_picture_outputs(None, html_out, force, file, original)
    meta, layers = api.stats_from_file(file)
    if html_out:
        _write_report_page(file, meta, layers, html_out, force)
    checks = api.verify(file, original) if original else []
    if json_out:
        from hmcompress.core.stats import totals

        payload = {"ok": all(c.ok for c in checks), "file": str(file), "options": meta.get("options", {}),
                   "layers": [s.to_json() for s in layers], "totals": totals(layers)}
        if original:
            payload["verify"] = [c.__dict__ for c in checks]
        if "recalibrated" in meta:
            payload["recalibrated"] = meta["recalibrated"]
        _json(payload)
    else:
        if markdown:
            sys.stdout.write(tables.markdown(layers, title=str(file.name)))
        else:
            tables.print_table(layers, _console(), title=str(file), wide=wide)
        if "recalibrated" in meta:
            _out(recalibration.describe(meta["recalibrated"]))
    _print_checks(checks)


def _write_report_page(file: pathlib.Path, meta: dict, layers: list, html_out: pathlib.Path, force: bool) -> None:
    from hmcompress.runtime import read_file

    matrices = read_file(file).matrices
    stats = {layer.name: vars(layer) for layer in layers if layer.compressed}  # as checked, not as stored
    relative = not meta.get("options", {}).get("absolute", False)
    _write_pictures(None, html_out, force, lambda plots: plots.file_pictures(matrices, stats, relative),
                    lambda pages, pictures: pages.file_page(file.name, meta.get("options", {}), layers, pictures))


@app.command("verify", cls=_Command, epilog="Example: hmcompress verify model.hm.safetensors --original model.pt")
def verify_cmd(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file (sharded: its directory or index)."),
    original: pathlib.Path = typer.Option(..., help="The checkpoint it was made from."),
    activations: Optional[pathlib.Path] = typer.Option(None, "--activations", help="The stats file it was "
                                                       "compressed with: also re-measure ||(W-H)X|| on its inputs."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
) -> None:
    """Re-measure every matrix against the original; exit 1 if any recorded figure does not hold."""
    from hmcompress import api

    checks = api.verify(file, original, activations)
    if json_out:
        _json({"ok": all(c.ok for c in checks), "matrices": [c.__dict__ for c in checks]})
    else:
        for c in checks:
            status = "ok" if c.ok else "FAILED"
            _out(f"{status:6} {c.name}: {_verify_figures(c)}")
            for problem in c.problems:
                _out(f"       {problem}")
        failed = sum(not c.ok for c in checks)
        _out(f"{len(checks) - failed} of {len(checks)} matrices hold every recorded figure"
             + (f"; {failed} do not" if failed else ""))
    _print_checks(checks)


def _verify_figures(check) -> str:
    """A check's error as the tolerance was given: relative to ||W||_F (or to ||WX||_F where it
    was built for its calibration inputs), or absolute."""
    if check.data_aware:
        if check.act_measured is None:
            return (f"relative weight error {check.measured_error / check.norm if check.norm else 0.0:.6g}; "
                    "its output error on the calibration inputs needs --activations")
        if check.act_norm and not check.absolute:
            return (f"relative output error {check.act_measured / check.act_norm:.6g} <= tol "
                    f"{check.act_budget / check.act_norm:.6g} on the calibration inputs")
        return f"output error {check.act_measured:.6g} <= budget {check.act_budget:.6g} on the calibration inputs"
    if check.norm and not check.absolute:
        return (f"relative error {check.measured_error / check.norm:.6g} <= tol "
                f"{check.budget / check.norm:.6g} (recorded {check.recorded_error / check.norm:.6g})")
    return f"error {check.measured_error:.6g} <= budget {check.budget:.6g} (recorded {check.recorded_error:.6g})"


def _print_checks(checks: list) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        _say(f"hmcompress: {len(failed)} matrices break a recorded bound: {failed[0].name}: "
             f"{failed[0].problems[0] if failed[0].problems else 'error above its bound'}")
        raise typer.Exit(1)


@app.command("compare", cls=_Command, epilog="Examples: hmcompress compare model.pt --tol 1e-2 --sweep 1e-1,1e-3 | "
                               "hmcompress compare model.pt --json > compare.json | hmcompress compare model.pt "
                               "--plot pictures/ --html compare.html")
def compare_cmd(
    model: pathlib.Path = typer.Argument(..., help="A checkpoint file or sharded directory."),
    tol: float = typer.Option(1e-2, "--tol", help="Relative Frobenius tolerance (the pictures use this one)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="More tolerances, comma-separated: 1e-1,1e-3."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated subset of the methods "
                                          "(default all; hm-auto, the reference, always runs)."),
    leaf: int = typer.Option(32, min=1, help="Smallest block side of the H-matrix methods."),
    min_size: int = typer.Option(64, min=0, help="Compare only matrices of at least this squared entries."),
    include: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to compare (repeatable)."),
    exclude: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to leave out (repeatable)."),
    conv: bool = typer.Option(True, "--conv/--no-conv", help="Conv kernels as out x in*k*k matrices."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout (docs/COMPARE.md)."),
    plot: Optional[pathlib.Path] = typer.Option(None, "--plot", help="Write PNG pictures into this directory."),
    html_out: Optional[pathlib.Path] = typer.Option(None, "--html", help="Write one self-contained HTML page."),
    force: bool = flag("--force", help="Overwrite existing pictures and page."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help="A model package's factory, "
                                                "e.g. sample_models.classifier:build: also each method's "
                                                "task metric at --tol."),
    activations: Optional[pathlib.Path] = typer.Option(None, "--activations", help="A stats file of hmcompress "
                                                       "calibrate: errors and --tol on each layer's output on "
                                                       "its calibration inputs; adds hm-aware, svd-llm, "
                                                       "gptq-int8 and gptq-int4."),
    quiet: bool = flag("--quiet", "-q", help="No progress on stderr."),
) -> None:
    """hmcompress beside truncated SVD, pruning, int8/int4 quantization and the paper's algorithm:
    bytes and measured error per layer at each tolerance, and errors at a matched size."""
    from hmcompress.compare import baselines, comparison
    from hmcompress.io.checkpoint import Selection

    tols = comparison.tolerances(tol, sweep)
    chosen = baselines.select(methods, leaf, data_aware=activations is not None)
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv)
    if plot or html_out:
        _check_picture_outputs(plot, html_out, force, model, activations)
    task = _model_task(model_factory) if model_factory else None
    with _Bar(f"compare {model}", not quiet) as bar:
        result = comparison.compare_checkpoint(model, tols, chosen, selection, leaf, bar.update, task, activations)
    _write_pictures(plot, html_out, force, lambda plots: plots.comparison_pictures(result),
                    lambda pages, pictures: pages.comparison_page(result, pictures))
    if json_out:
        _json({"ok": True, **result.to_json()})
        return
    for table in comparison.tables(result):
        _print_text_table(table)


def _check_picture_outputs(plot: Optional[pathlib.Path], html_out: Optional[pathlib.Path], force: bool,
                           *inputs: Optional[pathlib.Path]) -> None:
    """Before any work: matplotlib is there, and the outputs can be written (the page replaces
    none of the ``inputs``)."""
    from hmcompress import api
    from hmcompress.report.plots import require_matplotlib

    require_matplotlib()
    if html_out:
        api.check_output(html_out, force, *inputs)
    if plot and plot.exists() and not plot.is_dir():
        raise UserError(f"{plot}: is not a directory")


def _write_pictures(plot: Optional[pathlib.Path], html_out: Optional[pathlib.Path], force: bool,
                    draw: Callable, page: Callable) -> None:
    """Draw the pictures once; write them into ``plot`` and/or embed them in the ``html_out`` page.

    Every file goes through a temporary file and a rename; existing pictures are refused before
    any is written (unless ``force``).
    """
    from hmcompress.io.writer import atomic_write
    from hmcompress.report import pages, plots

    if not (plot or html_out):
        return
    _say("drawing pictures")
    pictures = draw(plots)
    if plot:
        clash = [name for name in pictures if (plot / name).exists()]
        if clash and not force:
            raise OutputExists(plot / clash[0])
        plot.mkdir(parents=True, exist_ok=True)
        for name, png in pictures.items():
            atomic_write(plot / name, lambda tmp, png=png: tmp.write_bytes(png), overwrite=force)
        _say(f"wrote {len(pictures)} pictures to {plot}")
    if html_out:
        text = page(pages, pictures)
        atomic_write(html_out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=force)
        _say(f"wrote {html_out}")


def _print_text_table(text_table) -> None:
    """A `comparison.TextTable`: names fold at their dots, numbers never split."""
    from rich.table import Table

    table = Table()
    for i, header in enumerate(text_table.headers):
        table.add_column(header, overflow="fold", no_wrap=i > 0)
    for row in text_table.rows:
        table.add_row(*row)
    console = _console()
    print_line(console, text_table.title)
    console.print(table)
    for note in text_table.notes:
        print_line(console, note)


@app.command(cls=_Command, epilog="Example: hmcompress decompress model.hm.safetensors -o dense.safetensors")
def decompress(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="Dense safetensors file to write."),
    force: bool = flag("--force", help="Overwrite an existing output."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
) -> None:
    """Write the dense checkpoint (original names, shapes and dtypes) as safetensors."""
    from hmcompress import api

    api.check_output(output, force, file)
    count = api.decompress(file, output, overwrite=force)
    if json_out:
        _json({"ok": True, "file": str(file), "output": str(output), "tensors": count})
    else:
        _say(f"wrote {output} ({count} tensors)")


@app.command("inspect", cls=_Command, epilog="Example: hmcompress inspect model.pt --no-conv")
def inspect_cmd(
    model: pathlib.Path = typer.Argument(..., help="A checkpoint file or sharded directory."),
    min_size: int = typer.Option(64, min=0, help="Compress only matrices of at least this squared entries "
                                 "(64: 4096 entries, e.g. 64x64 or 16x256)."),
    include: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to compress (repeatable)."),
    exclude: list[str] = typer.Option([], metavar="GLOB", help="Tensor names to leave alone (repeatable)."),
    conv: bool = typer.Option(True, "--conv/--no-conv", help="Conv kernels as out x in*k*k matrices."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
) -> None:
    """List tensors, shapes, dtypes, sizes and what `compress` would do with each."""
    from hmcompress import api
    from hmcompress.io.checkpoint import Selection
    from hmcompress.report.tables import byte_size

    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv)
    ckpt, rows = api.inspect(model, selection)
    chosen = [r for r in rows if r["compress"]]
    summary = {"tensors": len(rows), "bytes": sum(r["bytes"] for r in rows), "compress": len(chosen),
               "compress_bytes": sum(r["bytes"] for r in chosen)}
    if json_out:
        _json({"ok": True, "file": str(model), "kind": ckpt.kind, "tensors": rows, "totals": summary})
        return
    from rich.table import Table

    table = Table()
    for col in ("name", "shape", "dtype", "bytes", "action"):
        table.add_column(col, overflow="fold", no_wrap=col in ("shape", "dtype", "bytes"))
    for r in rows:
        table.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], str(r["bytes"]),
                      "compress" if r["compress"] else f"passthrough: {r['reason']}")
    console = _console()
    print_line(console, f"{model} ({ckpt.kind})")
    console.print(table)
    print_line(console, f"{summary['tensors']} tensors, {byte_size(summary['bytes'])}; compress would take "
                        f"{summary['compress']} matrices, {byte_size(summary['compress_bytes'])}")


@app.command("evaluate", cls=_Command, epilog="Example: hmcompress evaluate sample_models.burgers_pinn:build "
                                "sample_models/burgers_pinn/burgers_pinn.safetensors --compressed "
                                "out/pinn.hm.safetensors --sweep")
def evaluate_cmd(
    model_factory: str = typer.Argument(..., help="The model's factory, e.g. sample_models.classifier:build."),
    checkpoint: pathlib.Path = typer.Argument(..., help="The original checkpoint."),
    compressed: pathlib.Path = typer.Option(..., "--compressed", help="Its compressed .hm.safetensors file."),
    samples: int = typer.Option(64, min=1, help="Sample inputs for the output error and error propagation."),
    ntk_samples: int = typer.Option(32, min=2, help="Sample inputs for the NTK (fewer if J would pass 512 MiB)."),
    sweep: bool = flag("--sweep", help="Also compress at tol 1e-1 .. 1e-3 and score each."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
    quiet: bool = flag("--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Task metric, output error, NTK and per-layer error propagation: compressed vs original
    (and vs truncated SVD at the same tolerance); the compressed model runs through hmruntime."""
    from hmcompress.evaluate import analysis
    from hmcompress.evaluate import tables as evaluation_tables

    _import_from_cwd()
    task = analysis.load_task(model_factory)
    log = None if quiet else _log_lines("evaluate")
    result = analysis.evaluate_compressed(task, checkpoint, compressed, samples, ntk_samples,
                                          analysis.SWEEP_TOLS if sweep else (), log)
    if json_out:
        _json({"ok": True, **result.to_json()})
    else:
        evaluation_tables.print_evaluation(result, _console())


@app.command("recalibrate", cls=_Command, epilog="Example: hmcompress recalibrate sample_models.burgers_pinn:build "
                                   "out/pinn.hm.safetensors -o out/pinn.rc.hm.safetensors")
def recalibrate_cmd(
    model_factory: str = typer.Argument(..., help="The model's factory, e.g. sample_models.burgers_pinn:build; "
                                        "its module must offer calibration_loss(model)."),
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="The recalibrated .hm.safetensors file to write."),
    steps: int = typer.Option(100, min=1, help="L-BFGS iterations."),
    force: bool = flag("--force", help="Overwrite an existing output."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
    quiet: bool = flag("--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Retrain the tensors the file stores exactly (biases, uncompressed layers) on the model's
    calibration loss; the H-matrices, their errors and bounds stay as they are."""
    from hmcompress import api
    from hmcompress.evaluate import analysis
    from hmcompress.train import recalibrate as recalibration

    api.check_output(output, force, file)
    _import_from_cwd()
    _module, hooks = analysis.load_hooks(model_factory, ("calibration_loss",))
    log = None if quiet else _log_lines("recalibrate")
    result = recalibration.recalibrate(hooks["factory"](), file, hooks["calibration_loss"], output, steps=steps,
                                       overwrite=force, progress=log)
    if json_out:
        _json({"ok": True, **result.to_json()})
    else:
        _out(f"{result.output}: retrained {len(result.tensors)} tensors ({result.numbers} numbers); "
             f"loss {result.loss_before:.6g} -> {result.loss_after:.6g}")


@app.command("calibrate", cls=_Command, epilog="Examples: hmcompress calibrate sample_models.classifier:build "
                                 "sample_models/classifier/classifier.safetensors -o classifier.stats.safetensors | "
                                 "hmcompress calibrate benchmarks.architectures:crepe_tiny tiny.pth -o crepe.stats."
                                 "safetensors --data benchmarks.architectures:crepe_calibration_batches")
def calibrate_cmd(
    model_factory: str = typer.Argument(..., help="The model's factory, e.g. sample_models.classifier:build.",
                                        metavar="FACTORY"),
    checkpoint: pathlib.Path = typer.Argument(..., help="The checkpoint that fills the model (never unpickled)."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="The stats file to write (safetensors)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="MODULE:FUNCTION", help="A function returning the "
                                       "input batches (default: the factory module's calibration_batches)."),
    conv: bool = typer.Option(True, "--conv/--no-conv", help="Also conv kernels' inputs (as patches)."),
    force: bool = flag("--force", help="Overwrite an existing output."),
    json_out: bool = flag("--json", help="Print one JSON document on stdout."),
    quiet: bool = flag("--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Run the model on calibration batches and store, per linear (and conv) layer, the second
    moment G = X Xᵀ / N of its inputs (float64) with N: what data-aware compression needs."""
    from hmcompress import api, calibrate

    api.check_output(output, force, checkpoint)
    _import_from_cwd()
    log = None if quiet else _log_lines("calibrate")

    def progress(done: int) -> None:
        if log is not None and (done & (done - 1) == 0 or done % 100 == 0):
            log(f"{done} batch{'' if done == 1 else 'es'} done")

    result = calibrate.calibrate_checkpoint(model_factory, checkpoint, output, data, conv, force, progress)
    if log is not None:
        log(f"wrote {result.output} ({len(result.stats)} layers, {result.batches} batches)")
    if json_out:
        _json({"ok": True, **result.to_json()})
        return
    from rich.table import Table

    table = Table()
    for col in ("name", "n", "samples", "batches"):
        table.add_column(col, overflow="fold", no_wrap=col != "name")
    for row in result.to_json()["layers"]:
        table.add_row(row["name"], str(row["size"]), str(row["samples"]), str(row["batches"]))
    console = _console()
    print_line(console, f"{result.output}: input second moments of {len(result.stats)} layers")
    console.print(table)


def _model_task(spec: str):
    """The model package a --model-factory names (from the working directory too)."""
    from hmcompress.evaluate import analysis

    _import_from_cwd()
    return analysis.load_task(spec)


def _log_lines(command: str) -> Callable[[str], None]:
    """Progress messages as plain lines on stderr, prefixed with the command."""
    return lambda message: _say(f"{command}: {message}")


def _import_from_cwd() -> None:
    """Let a factory spec name the user's own package in the working directory, as `python -m` would."""
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))


# The library names options as its parameters do; the command line shows the flags.
FLAGS = {"tol": "--tol", "strategy": "--strategy", "precision": "--precision", "leaf": "--leaf",
         "device": "--device", "max_error": "--max-error", "min_ratio": "--min-ratio", "sweep": "--sweep",
         "methods": "--methods", "model_tol": "--model-tol"}


def _in_cli_terms(exc: Exception) -> str:
    """A user error's message, with the library's option names turned into the flags."""
    if isinstance(exc, OptionError):
        return f"{FLAGS.get(exc.option, exc.option)} {exc.problem}"
    if isinstance(exc, OutputExists):
        return f"{exc.path}: exists (use --force to overwrite)"
    return str(exc)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Each warning as one line on stderr (torch's own included), never a source excerpt."""
    shown = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        yield
    finally:
        warnings.showwarning = shown


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (with --json,
    also ``{"ok": false, "error": ...}`` on stdout); each warning becomes one line on stderr."""
    args = sys.argv[1:]
    json_out = "--json" in args
    _debug["on"] = "--debug" in args[1:]  # after the command too, where typer would refuse it
    if _debug["on"]:
        sys.argv = [sys.argv[0], *(a for a in args if a != "--debug")]
    try:
        with _one_line_warnings():
            code = app(standalone_mode=False)  # usage errors come back here, not as typer's boxes
    except getattr(click_exceptions, "NoArgsIsHelpError", ()):  # bare `hmcompress`: typer printed the help
        sys.exit(2)
    except click_exceptions.ClickException as exc:  # bad option, missing argument, unknown command
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "hmcompress"
        _fail(f"{exc.format_message()} (see {command} --help)", json_out, exc.exit_code)
    except typer.Abort:
        _fail("aborted", json_out, 1)
    except Exception as exc:
        from hmcompress.errors import USER_ERRORS

        if _debug["on"] or not isinstance(exc, USER_ERRORS):
            raise
        _fail(_in_cli_terms(exc), json_out, 2)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, json_out: bool, code: int) -> None:
    """One line on stderr (and with --json one document on stdout), then exit with ``code``."""
    message = " ".join(message.split())
    _say(f"hmcompress: error: {message}")
    if json_out:
        sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
    sys.exit(code)


def _warning_line(message, _category, _filename, _lineno, _file=None, _line=None) -> None:
    _say(f"hmcompress: warning: {' '.join(str(message).splitlines())}")
