"""Every command and code block of README.md runs as written (issue 21, items 4 and 9).

The blocks are read from README.md itself: every fenced ```bash and ```python block, and the steps
of the ```yaml CI example. They run in README order in one temporary working directory that
stands for the repository root (`sample_models` and `.venv` are links to this checkout's); each
YAML job runs in a fresh one, as on a fresh checkout. The README's placeholders for the reader's
own files are written there (PROVIDED); text is changed before a command runs only where REPLACED
says so and why. A line or step that cannot run here is in NOT_RUN with the reason; every other
one must exit 0 (or the code EXPECTED_EXIT gives). A table entry the README no longer has fails
`test_the_tables_name_what_the_readme_says`.

`hmcompress ...` lines run in this process through the `cli` runner (conftest.py), after the
shell's part is done here: $VARIABLES expanded, words split as the shell splits them (shlex),
globs expanded, stdout redirected by `> FILE` / `>> FILE`. A line using any other shell syntax,
or another program, runs in bash; `bash -n` checks each block's syntax first, so a line bash
would not parse fails here too. A Python block runs in a fresh namespace, in the working
directory, with it first on sys.path (as for `python` started there, which imports the
`hmruntime.py` written beside a compressed file); tracebacks give README.md's line numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The README's placeholders for the reader's own things, and what stands for each here.
PROVIDED = {
    "model.pt": "the sample classifier's trained state dict (its build() filled from classifier.safetensors), "
                "written with torch.save",
    "ckpts/*.safetensors": "ckpts/ holding two shipped checkpoints, classifier.safetensors and burgers_pinn.safetensors",
    "mypkg.model:build": "mypkg/model.py: the sample classifier's module (build, evaluate, sample_inputs, METRIC) "
                         "and, for `recalibrate`, a calibration_loss it lacks: cross-entropy on 256 training images",
}
TINY_SCHEDULE = ("--width 16 --hidden-layers 2 --collocation 100 --adam-epochs 1 --lbfgs-epochs 2 --steps 3 "
                 "--refine-every 1 --every 1 --penalty-epochs 2 --leaf 8")
# Text changed in a command before it runs: {README text: (what runs instead, why)}.
REPLACED = {
    "--out out/burgers_dynamic": (f"--out out/burgers_dynamic {TINY_SCHEDULE}",
                                  "the measured run trains three networks for about 6 minutes; this runs the "
                                  "same command on the tiny schedule of tests/test_burgers_dynamic.py"),
}
PYTORCH_CPU = "https://download.pytorch.org/whl/cpu"
# Lines and CI steps that do not run here, with the reason (the key is the command without its
# comment, or "uses: ACTION" for a GitHub Actions step).
NOT_RUN = {
    "make demo": "builds .venv with pip from the network (when its stamp is older than pyproject.toml) and "
                 "writes out/ in the checkout; its three commands (compress, report, verify of the sample "
                 "classifier) are among the Command line block's lines, run on the same weights",
    "make test": "the whole test suite, this file included",
    f"pip install torch==2.13.0 --index-url {PYTORCH_CPU}": "installs from the network; this interpreter "
                                                           "already has torch",
    "pip install '.[plot]'": "installs from the network; this interpreter already has hmcompress (this "
                             "checkout) and matplotlib",
    "pip install './hmcompress[plot]'": "installs from the network, from a checkout the step before makes on "
                                        "GitHub; as the line above",
    "uses: actions/checkout@v4": "a GitHub Actions step, run by GitHub's runner (here: the working directory)",
    "uses: actions/setup-python@v5": "a GitHub Actions step (here: this interpreter)",
    "uses: actions/upload-artifact@v4": "a GitHub Actions step; test_ci_job checks that the files it uploads "
                                        "were written",
}
# Lines the README says fail, with the exit code it gives them.
EXPECTED_EXIT: dict[str, int] = {}

SHELLS = {"bash", "sh", "shell"}
DATA = {"json", "text"}  # blocks that show data, not commands
SHELL_SYNTAX = re.compile(r"[|&;<`(){}]|\d>|>[^>\s]")  # pipes, lists, subshells, fd redirections, `>FILE`


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first line
    text: str

    @property
    def id(self) -> str:
        return f"{self.lang}@L{self.line}"


@dataclasses.dataclass(frozen=True)
class Line:
    line: int
    command: str  # without its comment, continuation lines joined, whitespace collapsed


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, start, lang = [], None, ""
    for number, text in enumerate(lines, 1):
        fence = re.match(r"^```(\S*)\s*$", text)
        if not fence:
            continue
        if start is None:
            start, lang = number + 1, fence[1]
        else:
            blocks.append(Block(lang, start, "".join(f"{t}\n" for t in lines[start - 1:number - 1])))
            start = None
    assert start is None, f"README.md: the block opened at line {start - 1} is never closed"
    return blocks


def strip_comment(text: str) -> str:
    """``text`` before its shell comment: a ``#`` starting a word outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def shell_lines(block: Block) -> list[Line]:
    out, pending, first = [], "", None
    for number, text in enumerate(block.text.splitlines(), block.line):
        first = number if first is None else first
        code = strip_comment(text).rstrip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        command = " ".join((pending + code).split())
        if command:
            out.append(Line(first, command))
        pending, first = "", None
    return out


def yaml_steps(block: Block) -> list[Line]:
    """The `uses:` steps (as ``uses: ACTION``) and the lines of every `run:` command."""
    lines = block.text.splitlines()
    out, i = [], 0
    while i < len(lines):
        key = re.match(r"^(\s*)(- )?(uses|run):\s*(.*?)\s*$", lines[i])
        i += 1
        if not key:
            continue
        indent = len(key[1]) + len(key[2] or "")
        value = strip_comment(key[4]).strip()
        if key[3] == "uses":
            out.append(Line(block.line + i - 1, f"uses: {value}"))
        elif value in ("|", "|-", ">"):
            assert value == "|", f"README.md:{block.line + i - 1}: only `run: |` blocks are read here"
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                if lines[i].strip():
                    out.extend(Line(block.line + i, line.command) for line in shell_lines(Block("", 0, lines[i])))
                i += 1
        else:
            out.append(Line(block.line + i - 1, " ".join(value.split())))
    return out


BLOCKS = readme_blocks()
SHARED = [b for b in BLOCKS if b.lang in SHELLS | {"python"}]  # in README order, in one directory
JOBS = [b for b in BLOCKS if b.lang == "yaml"]


# ------------------------------------------------------------------------------------------------
# Running


def provide(work: pathlib.Path) -> pathlib.Path:
    """A working directory standing for the repository root, with PROVIDED in it."""
    import torch
    from safetensors.torch import load_file

    from sample_models import burgers_pinn, classifier

    (work / "sample_models").symlink_to(ROOT / "sample_models", target_is_directory=True)
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)  # `.venv/bin/python` is this interpreter
    model = classifier.build()
    model.load_state_dict(load_file(classifier.CHECKPOINT))
    torch.save(model.state_dict(), work / "model.pt")
    (work / "ckpts").mkdir()
    for checkpoint in (classifier.CHECKPOINT, burgers_pinn.CHECKPOINT):
        shutil.copy(checkpoint, work / "ckpts")
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "model.py").write_text('''"""Stands for the README's `mypkg.model`."""
import functools

import torch

from sample_models.classifier import HIGHER_IS_BETTER, METRIC, build, evaluate, load_data, sample_inputs  # noqa: F401


@functools.cache
def _batch():
    x, y, _, _ = load_data()
    return x[:256], y[:256]


def calibration_loss(model):
    x, y = _batch()
    return torch.nn.functional.cross_entropy(model(x), y)
''')
    return work


@contextlib.contextmanager
def fresh_imports(work: pathlib.Path):
    """``work`` first on sys.path; modules imported from it are forgotten afterwards."""
    path = sys.path[:]
    ours = ("hmruntime", "mypkg", "mypkg.model")
    saved = {name: sys.modules.pop(name) for name in ours if name in sys.modules}
    sys.path.insert(0, str(work))
    try:
        yield
    finally:
        sys.path[:] = path
        for name in ours:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], ""), word)


def run_line(line: Line, work: pathlib.Path, env: dict[str, str]) -> str | None:
    """Run one shell line in ``work``; what went wrong, or None."""
    command = line.command
    for text, (instead, _why) in REPLACED.items():
        command = command.replace(text, instead)
    words = shlex.split(expand(command, env))
    if words[0] == "hmcompress" and not SHELL_SYNTAX.search(command):
        args, redirect = [], None
        words = iter(words[1:])
        for word in words:
            if word in (">", ">>"):
                redirect = (word, next(words))
            elif any(c in word for c in "*?[") and (matches := sorted(glob.glob(word, root_dir=work))):
                args += matches
            else:
                args.append(word)
        with contextlib.chdir(work), fresh_imports(work):
            run = run_cli(*args)
        if redirect:
            mode, target = redirect
            with open(work / target, "a" if mode == ">>" else "w") as f:
                f.write(run.stdout)
        code, stdout, stderr = run.code, run.stdout, run.stderr
    else:
        # Not an hmcompress command (mkdir, the interpreter running a script): the shell's own.
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    expected = EXPECTED_EXIT.get(line.command, 0)
    if code == expected:
        return None
    return (f"README.md:{line.line}: `{command}` exited {code}, not {expected}\n"
            f"--- stdout (end)\n{stdout[-3000:]}\n--- stderr (end)\n{stderr[-3000:]}")


def shell_env(**extra: str) -> dict[str, str]:
    bin_dir = str(pathlib.Path(sys.executable).parent)  # `hmcompress`, `python`: this interpreter's
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run_block(block: Block, work: pathlib.Path) -> str | None:
    """Run a bash or Python block in ``work``; what went wrong, or None."""
    if block.lang == "python":
        # Compiled as README.md's own lines, so that a traceback points there.
        code = compile("\n" * (block.line - 1) + block.text, str(README), "exec")
        with contextlib.chdir(work), fresh_imports(work):
            exec(code, {"__name__": "__main__"})
        return None
    syntax = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
    if syntax.returncode:
        return f"README.md:{block.line}: bash cannot parse the block: {syntax.stderr}"
    env = shell_env()
    for line in shell_lines(block):
        if line.command in NOT_RUN:
            continue
        if (problem := run_line(line, work, env)) is not None:
            return problem
    return None


class Readme:
    """The shared working directory; each block runs once, after every block above it has."""

    def __init__(self, work: pathlib.Path) -> None:
        self.work = provide(work)
        self.outcome: dict[Block, str | None] = {}

    def run_through(self, block: Block) -> str | None:
        for earlier in SHARED[:SHARED.index(block) + 1]:
            if earlier not in self.outcome:
                try:
                    self.outcome[earlier] = run_block(earlier, self.work)
                except Exception as error:  # a Python block's; reported by that block's own test
                    self.outcome[earlier] = f"README.md block at line {earlier.line} raised {error!r}"
                    if earlier == block:
                        raise
        return self.outcome[block]


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> Readme:
    return Readme(tmp_path_factory.mktemp("readme"))


# ------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.slow  # the whole README takes minutes: `evaluate --sweep`, `compare --sweep`, `recalibrate`
@pytest.mark.parametrize("block", SHARED, ids=[b.id for b in SHARED])
def test_block_runs_as_written(readme, block):
    problem = readme.run_through(block)
    assert problem is None, problem
    skip_if_nothing_ran(shell_lines(block) if block.lang in SHELLS else [])


def skip_if_nothing_ran(lines: list[Line]) -> None:
    """A block whose every line is in NOT_RUN shows as skipped, with the reasons."""
    if lines and all(line.command in NOT_RUN for line in lines):
        pytest.skip("; ".join(f"README.md:{line.line} `{line.command}`: {NOT_RUN[line.command]}" for line in lines))


@pytest.mark.slow
@pytest.mark.parametrize("block", JOBS, ids=[b.id for b in JOBS])
def test_ci_job(block, tmp_path):
    """The job's `run:` lines on a fresh checkout, with a job summary file; what it uploads exists."""
    work = provide(tmp_path)
    summary = tmp_path / "step-summary.md"
    env = shell_env(GITHUB_STEP_SUMMARY=str(summary))
    ran = []
    for step in yaml_steps(block):
        if step.command in NOT_RUN:
            continue
        problem = run_line(step, work, env)
        assert problem is None, problem
        ran.append(step.command)
    skip_if_nothing_ran(yaml_steps(block))
    if any("$GITHUB_STEP_SUMMARY" in command for command in ran):
        assert "\n|" in "\n" + summary.read_text(), "no Markdown table in the job summary"
    uploads = re.search(r"upload-artifact.*?path: \|\n((?:\s+\S+\n)+)", block.text, re.S)
    for name in (uploads[1].split() if uploads else []):
        assert (work / name).stat().st_size > 0, name


def test_every_block_and_step_is_accounted_for():
    """Every block is a kind run here or plain data (DATA), and every GitHub Actions step is in
    NOT_RUN (every other line runs)."""
    kinds = {b.lang for b in BLOCKS}
    assert kinds <= SHELLS | {"python", "yaml"} | DATA, f"README.md has blocks of a kind no test runs: {kinds}"
    for block in JOBS:
        for step in yaml_steps(block):
            assert step.command in NOT_RUN or not step.command.startswith("uses:"), (
                f"README.md:{step.line}: a GitHub Actions step not in NOT_RUN: {step.command}")


def test_the_tables_name_what_the_readme_says():
    text = README.read_text()
    commands = {line.command for b in SHARED if b.lang in SHELLS for line in shell_lines(b)}
    commands |= {step.command for b in JOBS for step in yaml_steps(b)}
    for placeholder in PROVIDED:
        assert placeholder in text, f"PROVIDED: README.md no longer says {placeholder!r}"
    for replaced in REPLACED:
        assert any(replaced in command for command in commands), f"REPLACED: no README command has {replaced!r}"
    for command in [*NOT_RUN, *EXPECTED_EXIT]:
        assert command in commands, f"no README command is {command!r} any more"


def test_ci_example_is_a_workflow_that_installs_from_a_checkout():
    """It has a trigger, takes torch's CPU build before hmcompress, and installs hmcompress from a
    checkout (it is on no package index); the variant for another repository says what to fill in."""
    job = next(b for b in JOBS if "\njobs:" in "\n" + b.text)
    assert re.search(r"^on: \[push, pull_request\]$", job.text, re.M), job.text
    steps = [s.command for s in yaml_steps(job)]
    torch_step = steps.index(f"pip install torch==2.13.0 --index-url {PYTORCH_CPU}")
    assert steps.index("pip install '.[plot]'") > torch_step
    assert steps[0] == "uses: actions/checkout@v4"
    assert not any("'hmcompress[" in s.command for b in JOBS for s in yaml_steps(b))  # on no index
    other = next(b for b in JOBS if "repository:" in b.text)
    assert re.search(r"repository: OWNER/hmcompress\s+# FILL IN", other.text), other.text
    assert "path: hmcompress" in other.text and "- run: pip install './hmcompress[plot]'" in other.text


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_install_takes_torch_from_the_index_it_is_given():
    """`make install TORCH_INDEX=URL` (the README's way to the CPU build) passes it to pip for torch
    only; without it the line is as before. `make -n` prints the recipe without running it."""

    def recipe(*args: str) -> list[str]:
        done = subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True)
        return [line for line in done.stdout.splitlines() if "pip install" in line]

    assert f"make install TORCH_INDEX={PYTORCH_CPU}" in README.read_text()
    plain, cpu = recipe(), recipe(f"TORCH_INDEX={PYTORCH_CPU}")
    assert plain[1].split() == [".venv/bin/python", "-m", "pip", "install", "-q", "torch==2.13.0"]
    assert cpu[1].split() == plain[1].split() + ["--index-url", PYTORCH_CPU]
    assert cpu[2] == plain[2] and "--index-url" not in cpu[2]  # the package itself from PyPI as before
