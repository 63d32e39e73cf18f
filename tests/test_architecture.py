"""The layout is the architecture: data flows forward (runtime <- core <- io <- the rest), no
module imports one that imports it back, and the public API is where the README says."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import warnings

import pytest

import hmcompress

PACKAGE = pathlib.Path(hmcompress.__file__).parent
# Each layer may import itself, the layers listed for it and the root package (its version), nothing
# else of hmcompress.
ALLOWED = {
    "runtime": set(),
    "errors": {"runtime"},
    "core": {"runtime", "errors"},
    "io": {"runtime", "errors", "core"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The hmcompress modules a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hmcompress"):
            assert node.level == 0
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                         or (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).is_dir())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hmcompress"))
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ALLOWED))
def test_lower_layers_import_nothing_above_them(module):
    layer = _layer(module)
    for target in MODULES[module]:
        assert _layer(target) in ALLOWED[layer] | {layer, ""}, f"{module} imports {target}"


def test_no_module_imports_the_cli():
    assert not [m for m, targets in MODULES.items() if "hmcompress.cli" in targets and m != "hmcompress.__main__"]


def test_no_import_cycles_between_modules():
    # A package's __init__ importing its own modules (re-exports) is no cycle of the data flow.
    graph = {m: {t for t in targets if t in MODULES and t != m and not t.startswith(m + ".")}
             for m, targets in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_public_api_is_reexported_lazily():
    for name in hmcompress.__all__:
        assert getattr(hmcompress, name) is not None
    # A real interpreter: `import hmcompress` (what `hmcompress --help` pays first) loads no torch.
    code = "import sys, hmcompress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_old_import_paths_are_the_moved_modules_and_warn():
    import hmcompress.core.build as new

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop("hmcompress.build", None)
        import hmcompress.build as old
    assert old is new
    assert any(issubclass(w.category, DeprecationWarning) and "hmcompress.core.build" in str(w.message)
               for w in caught)
    from hmcompress.train import layers
    with pytest.warns(DeprecationWarning, match="TrainableHLinear"):
        assert layers.HLinear is layers.TrainableHLinear


def test_the_repository_uses_no_old_import_path():
    from hmcompress._moved import MOVED

    root = PACKAGE.parent
    for path in sorted([*root.glob("hmcompress/**/*.py"), *root.glob("tests/*.py"), *root.glob("benchmarks/*.py"),
                        *root.glob("sample_models/**/*.py")]):
        if path.name == "test_architecture.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            old = [n for n in names if n in MOVED]
            assert not old, f"{path.relative_to(root)}:{node.lineno} imports {old[0]}, now {MOVED[old[0]]}"
