"""Writing files: atomic, deterministic, permissions, refusals, and the standalone runtime shim."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import safetensors.torch
import torch
from helpers import HEADER, mixed_matrix, write_model_file
from safetensors import safe_open
from torch import nn

import hmcompress
import hmcompress.io.writer
import hmcompress.runtime as runtime
from hmcompress.errors import UserError
from hmcompress.io.writer import write_compressed, write_dense, write_runtime_shim
from hmcompress.runtime import read_file
from hmcompress.runtime.bundle import SHIM_MODULES, shim_source


def one_matrix(path: pathlib.Path, **kwargs) -> None:
    hm = mixed_matrix()
    write_compressed(path, {"enc.w": (hm, {"orig_shape": [24, 20], "stats": {"fro_error": 0.5}})},
                     {"enc.b": (torch.arange(4.0), "1-D")}, HEADER, **kwargs)


def test_metadata_layout(tmp_path):
    path = tmp_path / "a.hm.safetensors"
    one_matrix(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert list(meta) == ["hmcompress"]
    text = meta["hmcompress"]
    parsed = json.loads(text)
    assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    assert parsed["format"] == "hmcompress" and parsed["version"] == 4
    assert parsed["matrices"]["enc.w"] == {"shape": [24, 20], "orig_shape": [24, 20], "dtype": "float32",
                                           "prefix": "enc.w.hm.", "stats": {"fro_error": 0.5}}
    assert parsed["passthrough"] == {"enc.b": "1-D"}
    assert parsed["options"] == HEADER["options"] and parsed["extra"] == HEADER["extra"]
    assert {"enc.b", "enc.w.hm.blocks", "enc.w.hm.segments", "enc.w.hm.rows", "enc.w.hm.pool.f32",
            "enc.w.hm.scale.i8"} <= keys


@pytest.mark.slow
def test_bytes_are_deterministic(tmp_path):
    one_matrix(tmp_path / "a.st")
    one_matrix(tmp_path / "b.st")
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_writer import one_matrix; "
            "import pathlib; one_matrix(pathlib.Path(sys.argv[1]))")
    # A real process: the bytes must not depend on this process (its hash seed, state).
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.st"), str(pathlib.Path(__file__).parent)],
                   check=True)
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "c.st").read_bytes()


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        one_matrix(tmp_path / "a.st")
        write_dense(tmp_path / "d.st", {"x": torch.ones(2)})
        shim = write_runtime_shim(tmp_path)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.st", tmp_path / "d.st", shim):
        assert path.stat().st_mode & 0o777 == 0o644


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.st"
    path.write_bytes(b"precious")
    with pytest.raises(UserError, match=r"a\.st: exists \(pass overwrite=True to replace it\)"):
        one_matrix(path)
    with pytest.raises(UserError, match="exists"):
        write_dense(path, {"x": torch.ones(2)})
    assert path.read_bytes() == b"precious"
    one_matrix(path, overwrite=True)
    assert "enc.w" in read_file(path).matrices
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.st"]


def test_no_temporary_file_after_failure(tmp_path, monkeypatch):
    def broken(_path, _item):  # the header is written by then: the temporary file is partial
        raise OSError("disk full")

    monkeypatch.setattr(hmcompress.io.writer, "_tensor_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        one_matrix(tmp_path / "a.st")
    with pytest.raises(OSError, match="disk full"):
        write_dense(tmp_path / "d.st", {"x": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_name_collisions_are_refused(tmp_path):
    hm = mixed_matrix()
    info = {"orig_shape": [24, 20], "stats": {}}
    with pytest.raises(UserError, match="collides"):
        write_compressed(tmp_path / "a.st", {"w": (hm, info)}, {"w.hm.blocks": (torch.ones(1), "x")}, HEADER)
    with pytest.raises(UserError, match="both compressed and passed through"):
        write_compressed(tmp_path / "a.st", {"w": (hm, info)}, {"w": (torch.ones(1), "x")}, HEADER)
    assert list(tmp_path.iterdir()) == []


def test_write_dense_round_trip_with_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    state = {"emb": base, "head": base, "view": base[2:], "t": base.T, "half": torch.ones(3, dtype=torch.bfloat16),
             "empty": torch.zeros(0, 5)}
    write_dense(tmp_path / "d.st", state)
    back = safetensors.torch.load_file(str(tmp_path / "d.st"))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype


def test_write_runtime_shim(tmp_path):
    shim = write_runtime_shim(tmp_path)
    assert shim == tmp_path / "hmruntime.py"
    assert shim.read_bytes() == shim_source(hmcompress.__version__).encode()
    before = shim.stat()
    assert write_runtime_shim(tmp_path) == shim
    after = shim.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    shim.write_text("stale")
    write_runtime_shim(tmp_path)
    assert shim.read_bytes() == shim_source(hmcompress.__version__).encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmruntime.py"]


def test_shim_is_the_runtime_modules_verbatim_in_order():
    """Every top-level statement of every runtime module appears in the shim, unchanged and in
    module order; the shim defines every public name of `hmcompress.runtime`."""
    import ast

    text = shim_source(hmcompress.__version__)
    position = 0
    for module in SHIM_MODULES:
        source = (pathlib.Path(runtime.__file__).parent / f"{module}.py").read_text()
        body = ast.parse(source).body[1:]  # after the module docstring
        for statement in body:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                continue
            segment = ast.get_source_segment(source, statement)
            found = text.find(segment, position)
            assert found >= 0, f"{module}.py: {segment.splitlines()[0]!r} missing or out of order"
            position = found + len(segment)
    shim = types.ModuleType("hmruntime_under_test")  # dataclasses resolve annotations in sys.modules
    sys.modules[shim.__name__] = shim
    try:
        exec(compile(text, "hmruntime.py", "exec"), shim.__dict__)
    finally:
        del sys.modules[shim.__name__]
    assert set(runtime.public_names()) <= shim.__dict__.keys()
    assert not any(line.startswith("from hmcompress") for line in text.splitlines())


SHIM_SCRIPT = r"""
import sys
sys.modules["hmcompress"] = None  # not importable
import torch
from torch import nn
import hmruntime
try:
    import hmcompress
except ImportError:
    pass
else:
    raise SystemExit("hmcompress importable")
path = sys.argv[1]
def make():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16), nn.Linear(16, 8))
dense = make()
dense.load_state_dict(hmruntime.load_state_dict(path))
patched = make()
print(hmruntime.patch(patched, path))
x = torch.randn(3, 24)
assert isinstance(patched[0], hmruntime.CompactLinear)
assert torch.allclose(patched(x), dense(x), atol=1e-5), (patched(x) - dense(x)).abs().max()
assert "hmcompress" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""


@pytest.mark.slow
def test_shim_works_without_hmcompress(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    path = tmp_path / "m.hm.safetensors"
    write_model_file(path, model, {"0.weight", "2.weight"})
    write_runtime_shim(tmp_path)
    script = tmp_path / "use.py"
    script.write_text(SHIM_SCRIPT)
    # A real process: one without hmcompress on its path.
    result = subprocess.run([sys.executable, str(script), str(path)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['0',", "'2']", "ok"]
