"""Command line: thin wiring from options to `hmcompress.api`, one clear line per user error.

Exit codes: 0 ok, 1 a quality check failed (verify), 2 bad input or usage.
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import api, report
from .build import CompressionOptions
from .checkpoint import Selection
from .errors import USER_ERRORS, UserError

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
) -> None:
    """Compress every eligible weight matrix into an H-matrix within --tol."""
    if output and len(models) > 1:
        raise UserError("-o/--output takes one input; use --out-dir for several")
    options = CompressionOptions(tol=tol, absolute=absolute, strategy=strategy, precision=precision, leaf=leaf)
    selection = Selection(min_size=min_size, include=tuple(include), exclude=tuple(exclude), conv=conv)
    targets = [output or api.default_output(model, out_dir) for model in models]
    _refuse_duplicate_outputs(models, targets)
    results = []
    for model, target in zip(models, targets):
        with _progress(not quiet, str(model)) as progress:
            result = api.compress_checkpoint(model, target, options, selection, overwrite=force,
                                             progress=progress)
        results.append(result)
        if not json_out:
            report.print_table(result.layers, stdout, title=f"{model} -> {result.output}")
    if json_out:
        payload = [{"ok": True, "source": str(r.source), "output": str(r.output), "options": r.options,
                    "layers": [s.to_json() for s in r.layers], "totals": r.totals()} for r in results]
        stdout.print_json(report.to_json(payload if len(payload) > 1 else payload[0]))


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
) -> None:
    """Per-layer errors, bounds and compression ratios stored in a compressed file."""
    meta, layers = api.stats_from_file(file)
    checks = api.verify(file, original) if original else []
    if json_out:
        payload = {"ok": all(c.ok for c in checks), "file": str(file), "options": meta.get("options", {}),
                   "layers": [s.to_json() for s in layers], "totals": api.totals(layers)}
        if checks:
            payload["verify"] = [c.__dict__ for c in checks]
        stdout.print_json(report.to_json(payload))
    elif markdown:
        sys.stdout.write(report.markdown(layers, title=str(file.name)))
    else:
        report.print_table(layers, stdout, title=str(file))
    _print_checks(checks, json_out)


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
    _print_checks(checks, True)


def _print_checks(checks: list, quiet: bool) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        stderr.print(f"hmcompress: {len(failed)} matrices exceed their recorded error bound", markup=False)
        raise typer.Exit(1)


@app.command()
def decompress(
    file: pathlib.Path = typer.Argument(..., help="A compressed .hm.safetensors file."),
    output: pathlib.Path = typer.Option(..., "-o", "--output", help="Dense safetensors file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
) -> None:
    """Write the dense checkpoint (original names, shapes and dtypes) as safetensors."""
    from .runtime import load_state_dict
    from .writer import write_dense

    if output.exists() and not force:
        raise UserError(f"{output}: exists (use --force to overwrite)")
    state = load_state_dict(file)
    write_dense(output, state, overwrite=force)
    stderr.print(f"wrote {output} ({len(state)} tensors)", markup=False, highlight=False)


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


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except USER_ERRORS as exc:
        if _debug["on"]:
            raise
        stderr.print(f"hmcompress: error: {exc}", markup=False, highlight=False)
        sys.exit(2)
