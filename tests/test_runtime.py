"""The standalone runtime: validation, reading files, dense loading, HLinear and patch."""
from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import struct

import measure
import numpy as np
import pytest
import torch
from helpers import HEADER, bits, compressed, mixed_matrix, pack, reference_decoded, write_model_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import hmcompress.runtime as runtime
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.io.writer import write_compressed
from hmcompress.runtime import (
    CODEC,
    CompactLinear,
    FormatError,
    HLinear,
    HMatrix,
    compact_layouts,
    load_state_dict,
    patch,
    read_file,
)
from hmcompress.runtime.bundle import SHIM_MODULES


def clone(hm: HMatrix, **changes) -> HMatrix:
    fields = {f.name: getattr(hm, f.name) for f in dataclasses.fields(hm)}
    fields = {k: (v.clone() if isinstance(v, torch.Tensor) else dict(v) if isinstance(v, dict) else v)
              for k, v in fields.items()}
    fields.update(changes)
    return HMatrix(**fields)


def rejects(hm: HMatrix, words: str) -> None:
    with pytest.raises(FormatError, match=words) as info:
        hm.validate("layer.weight")
    assert str(info.value).startswith("layer.weight: ")


# ---------------------------------------------------------------------------------------------
# validate


def test_valid_matrices_pass():
    mixed_matrix().validate()
    compressed(40, 33).validate()
    pack(torch.zeros(0, 5), []).validate()
    pack(torch.ones(3, 4), [(0, 0, 3, 4, ("zero",))]).validate()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_mixed_matrix_reconstructs(dtype):
    """Every kind of segment and codec decodes as the independent reference decoder (written from
    docs/FORMAT.md) does, bit for bit, and to the numbers that were packed."""
    hm = mixed_matrix(dtype=dtype)
    decoded = reference_decoded(hm)
    assert np.array_equal(bits(hm.to_dense(torch.float64)), decoded.h64.view(np.uint64))
    assert np.array_equal(bits(hm.to_dense()), decoded.bits)
    w = torch.randn(24, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype).double()
    h = torch.from_numpy(decoded.h64)
    # the f32 dense block holds W rounded to float32 (exactly W for narrower sources)
    assert torch.equal(h[:8, :12], w[:8, :12].float().double())
    # the zero block, and the rows no rows segment stores, are zero
    assert torch.all(h[8:16, 12:] == 0) and torch.all(h[[12, 14], :6] == 0)
    # the u8 rows share one step: the larger row's absmax over 127
    shared = w[[9, 10], :6]
    assert torch.all((h[[9, 10], :6] - shared).abs() <= shared.abs().max() / 127 / 2 * (1 + 1e-6))
    # the bf16 rows are W's rows within bfloat16's rounding; the i7 block within half a step per row
    assert torch.all((h[[13, 15], :6] - w[[13, 15], :6]).abs() <= 2.0**-8 * w[[13, 15], :6].abs())
    block, values = h[8:16, 6:12], w[8:16, 6:12]
    half_step = values.abs().amax(1, keepdim=True) / 63 / 2 * (1 + 1e-6)
    assert torch.all((block - values).abs() <= half_step)


def test_rejects_overlap_hole_and_outside():
    hm = mixed_matrix()
    blocks = hm.blocks.clone()
    blocks[1, 1] -= 1  # shifted left: overlaps block 0, leaves a hole at the right edge
    rejects(clone(hm, blocks=blocks), "overlap or leave a hole")
    blocks = hm.blocks.clone()
    blocks[0, 3] -= 1  # narrower: a hole
    rejects(clone(hm, blocks=blocks), "a hole")
    blocks = hm.blocks.clone()
    blocks[0, 2] += 1  # taller: overlaps the block below
    rejects(clone(hm, blocks=blocks), "overlap")
    blocks = hm.blocks.clone()
    blocks[5, 0] += 1  # the last block sticks out
    rejects(clone(hm, blocks=blocks), "outside")
    blocks = hm.blocks.clone()
    blocks[4, 3] = 0
    rejects(clone(hm, blocks=blocks), "empty")
    rejects(clone(hm, blocks=hm.blocks.long()), "int32")
    rejects(clone(hm, blocks=hm.blocks[:, :4]), "shape")


def test_rejects_equal_area_that_does_not_tile():
    w = torch.ones(4, 4)
    hm = pack(w, [(0, 0, 2, 4, ("zero",)), (2, 0, 2, 4, ("zero",))])
    blocks = hm.blocks.clone()
    blocks[1, 0] = 1  # same total area, overlapping rows 1, a hole at row 3
    rejects(clone(hm, blocks=blocks), "overlap or leave a hole")
    # A zero-size matrix has no blocks.
    rejects(clone(pack(torch.zeros(0, 3), []), blocks=torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.int32)),
            "no blocks")


def segment_with(hm: HMatrix, row: int, column: int, value: int) -> HMatrix:
    segments = hm.segments.clone()
    segments[row, column] = value
    return clone(hm, segments=segments)


def test_rejects_bad_segments():
    hm = mixed_matrix()
    seg = hm.segments
    dense = int((seg[:, 1] == 0).nonzero()[0])
    lowrank = int((seg[:, 1] == 1).nonzero()[0])
    integer = int((seg[:, 2] == CODEC["i8"].id).nonzero()[0])
    rejects(segment_with(hm, 0, 0, 99), "block out of range")
    rejects(segment_with(hm, 0, 1, 3), "unknown kind")
    rejects(segment_with(hm, 0, 2, 11), "unknown codec id 11")
    rejects(segment_with(hm, 0, 2, -1), "unknown codec id")
    rejects(segment_with(hm, dense, 3, 1), "dense segment has rank 0")
    rejects(segment_with(hm, lowrank, 3, 0), "low-rank segment has rank >= 1")
    rejects(segment_with(hm, lowrank, 4, 10**6), "outside pool")
    rejects(segment_with(hm, lowrank, 4, -1), "outside pool")
    rejects(segment_with(hm, integer, 5, 10**6), "scale range")
    rejects(segment_with(hm, integer, 5, -1), "scale range")
    rejects(segment_with(hm, lowrank, 5, 0), "must be -1")  # the first low-rank piece is f16
    # A dense segment and a low-rank one in the same block.
    rejects(segment_with(hm, lowrank, 0, int(seg[dense, 0])), "only segment")
    # Two low-rank segments of one block with the same codec.
    twin = int((seg[:, 0] == seg[lowrank, 0]).nonzero()[1])
    rejects(segment_with(hm, twin, 2, int(seg[lowrank, 2])), "two segments with codec")
    rejects(clone(hm, segments=hm.segments[:, :5]), "shape")


def test_rejects_bad_pools_scales_and_bitmaps():
    hm = mixed_matrix()
    rejects(clone(hm, pools={**hm.pools, "f32": hm.pools["f32"].double()}), "pool.f32 must be")
    rejects(clone(hm, pools={**hm.pools, "q3": torch.zeros(3)}), "unknown codec 'q3'")
    rejects(clone(hm, scales={**hm.scales, "f16": torch.zeros(3)}), "floating-point codec")
    rejects(clone(hm, scales={**hm.scales, "i8": hm.scales["i8"].half()}), "float32")
    rejects(clone(hm, pools={k: v for k, v in hm.pools.items() if k != "f64"}), "outside pool.f64")
    masks = hm.row_masks.clone()
    rejects(clone(hm, row_masks=masks[:-1]), "row bitmaps hold")
    masks[0] |= 2  # a third row in the first rows segment
    rejects(clone(hm, row_masks=masks), "bits set")
    masks = hm.row_masks.clone()
    masks[1] = masks[0]  # the bf16 rows segment stores the i4 one's rows
    rejects(clone(hm, row_masks=masks), "both store row")


# ---------------------------------------------------------------------------------------------
# files


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16),
                          nn.Linear(16, 8, bias=False))
    path = tmp_path / "m.hm.safetensors"
    hms = write_model_file(path, model, {"0.weight", "2.weight", "4.weight"})
    return model, path, hms


def test_read_file_round_trip(model_file):
    model, path, hms = model_file
    cf = read_file(path)
    assert set(cf.matrices) == set(hms)
    for name, hm in hms.items():
        assert torch.equal(cf.matrices[name].to_dense(), hm.to_dense())
        assert cf.matrices[name].dtype == torch.float32
        assert cf.metadata["matrices"][name]["prefix"] == name + ".hm."
    assert cf.metadata["format"] == "hmcompress" and cf.metadata["version"] == 4
    assert cf.metadata["extra"] == {"epoch": 3}
    assert set(cf.passthrough) == {"0.bias", "2.bias", "3.weight", "3.bias"}
    assert cf.metadata["passthrough"]["3.weight"] == "not selected"


def test_mixed_matrix_file_round_trip(tmp_path):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        hm = mixed_matrix(dtype=dtype)
        path = tmp_path / f"{dtype}.safetensors"
        write_compressed(path, {"w": (hm, {"orig_shape": [24, 5, 4], "stats": {}})}, {}, HEADER)
        back = read_file(path).matrices["w"]
        assert back.dtype == dtype
        assert torch.equal(back.to_dense(torch.float64), hm.to_dense(torch.float64))
        state = load_state_dict(path)
        assert state["w"].shape == (24, 5, 4) and state["w"].dtype == dtype
        assert torch.equal(state["w"].reshape(24, 20), hm.to_dense())


def test_load_state_dict_into_model(model_file):
    model, path, hms = model_file
    fresh = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16),
                          nn.Linear(16, 8, bias=False))
    fresh.load_state_dict(load_state_dict(path))  # strict
    for name, hm in hms.items():
        assert np.array_equal(bits(fresh.get_parameter(name).detach()), reference_decoded(hm).bits), name
    assert torch.equal(fresh[3].weight, model[3].weight)
    # each compressed layer's output moves by at most ||W - H||_2 ||x|| (measured independently)
    x = torch.randn(5, 24)
    with torch.no_grad():
        inputs = {0: x, 2: model[1](model[0](x)), 4: model[3](model[2](model[1](model[0](x))))}
        for index, layer_input in inputs.items():
            w = model[index].weight.double()
            e2 = measure.spectrum(w.numpy(), fresh[index].weight.double().numpy()).top_range[1]
            moved = torch.linalg.vector_norm((fresh[index](layer_input) - model[index](layer_input)).double(), dim=1)
            rounding = 1e-6 * float(torch.linalg.matrix_norm(w, 2)) * torch.linalg.vector_norm(layer_input, dim=1)
            assert torch.all(moved <= e2 * torch.linalg.vector_norm(layer_input.double(), dim=1) + rounding), index


def raw_file(path: pathlib.Path, header: dict, data: bytes = b"") -> pathlib.Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def rewrite_metadata(src: pathlib.Path, dst: pathlib.Path, change, extra_tensors=None) -> pathlib.Path:
    """Copy a compressed file with its metadata changed (and optionally more tensors)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hmcompress"])
    change(meta)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(dst), metadata={"hmcompress": json.dumps(meta)})
    return dst


def test_read_file_rejects_bad_headers(tmp_path, model_file):
    _model, good, _hms = model_file

    def fails(path, words):
        with pytest.raises(FormatError, match=words) as info:
            read_file(path)
        assert str(path) in str(info.value)

    fails(rewrite_metadata(good, tmp_path / "v.st", lambda m: m.update(version=5)), "version 5")
    fails(rewrite_metadata(good, tmp_path / "f.st", lambda m: m.update(format="other")), "format")
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.st"))
    fails(tmp_path / "plain.st", "no hmcompress metadata")
    fails(rewrite_metadata(good, tmp_path / "u.st", lambda _meta: None, {"stray": torch.ones(2)}),
          "'stray' is not explained")
    fails(rewrite_metadata(good, tmp_path / "missing.st", lambda m: m["passthrough"].update(ghost="x")),
          "'ghost' is missing")
    fails(rewrite_metadata(good, tmp_path / "shape.st",
                           lambda m: m["matrices"]["0.weight"].update(orig_shape=[3, 3])), "orig_shape")
    fails(rewrite_metadata(good, tmp_path / "dtype.st",
                           lambda _meta: None, {"0.weight.hm.pool.i4": torch.zeros(4)}), "0.weight.hm.pool.i4")
    data = good.read_bytes()
    (tmp_path / "long.st").write_bytes(struct.pack("<Q", len(data)) + data[8:])
    fails(tmp_path / "long.st", r"header claims \d+ bytes, file has \d+: not an hmcompress file")
    (tmp_path / "huge.st").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    fails(tmp_path / "huge.st", "header claims 4611686018427387904 bytes")
    (tmp_path / "short.st").write_bytes(b"abc")
    fails(tmp_path / "short.st", "truncated safetensors file")
    (tmp_path / "latin.st").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    fails(tmp_path / "latin.st", "not valid UTF-8 JSON")
    fails(raw_file(tmp_path / "empty.st", {}), "no hmcompress metadata")
    fails(raw_file(tmp_path / "badmeta.st", {"__metadata__": {"hmcompress": "{"}}), "not valid JSON")
    (tmp_path / "garbage.st").write_bytes(struct.pack("<Q", 3) + b"{x]")
    fails(tmp_path / "garbage.st", "header is not valid UTF-8 JSON")


def test_read_file_names_the_broken_tensor(tmp_path):
    hm = mixed_matrix()
    blocks = hm.blocks.clone()
    blocks[0, 3] -= 1
    broken = clone(hm, blocks=blocks)
    path = tmp_path / "b.st"
    tensors = {"enc.w.hm.blocks": broken.blocks, "enc.w.hm.segments": broken.segments,
               "enc.w.hm.rows": broken.row_masks,
               **{f"enc.w.hm.pool.{c}": p for c, p in broken.pools.items()},
               **{f"enc.w.hm.scale.{c}": s for c, s in broken.scales.items()}}
    meta = {"format": "hmcompress", "version": 3, "passthrough": {},
            "matrices": {"enc.w": {"shape": [24, 20], "orig_shape": [24, 20], "dtype": "float32",
                                   "prefix": "enc.w.hm.", "stats": {}}}}
    save_file(tensors, str(path), metadata={"hmcompress": json.dumps(meta)})
    with pytest.raises(FormatError, match=r"b\.st: enc\.w: blocks cover"):
        read_file(path)


# ---------------------------------------------------------------------------------------------
# HLinear and patch


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [mixed_matrix, lambda: compressed(45, 37, tol=1e-3)])
def test_hlinear_matches_dense(dtype, make, compact):
    hm = make()
    m, n = hm.shape
    bias = torch.randn(m)
    layer = HLinear(hm, bias, dtype=dtype, keep_compact=compact)
    dense = hm.to_dense(torch.float64)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    for shape in [(5, n), (2, 3, n), (n,), (runtime.SMALL_BATCH + 3, n)]:  # both layouts
        x = torch.randn(shape).to(dtype)
        y = layer(x)
        assert y.shape == (*shape[:-1], m) and y.dtype == dtype
        ref = x.double() @ dense.T + bias.to(dtype).double()
        scale = ref.abs().max().item() + 1
        assert (y.double() - ref).abs().max().item() <= tol * scale
    assert "blocks=" in repr(layer) and "bytes=" in repr(layer)


@pytest.mark.parametrize("make, gathers", [
    (lambda: compressed(64, 64, tol=1e-3), set()),  # tiles cover rows and columns in order
    (mixed_matrix, {"col_index"}),
    (lambda: compressed(45, 37, tol=1e-3), {"col_index", "out_index"}),
])
def test_identity_gathers_are_left_out(make, gathers):
    """A gather that moves nothing is skipped; the product is the same in all three layouts, with
    the bias fused into the second product (no ``out_index``) or added after it."""
    hm = make()
    plan = runtime.TilePlan.build(hm).tensors()
    assert {"col_index", "out_index"} & plan.keys() == gathers
    dense = hm.to_dense(torch.float64)
    bias = torch.randn(hm.shape[0], dtype=torch.float64)
    for batch in (1, 3, runtime.SMALL_BATCH + 1):
        x = torch.randn(batch, hm.shape[1], dtype=torch.float64)
        assert torch.allclose(runtime.tile_product(plan, x), x @ dense.T, atol=1e-10)
        assert torch.allclose(runtime.tile_product(plan, x, bias), x @ dense.T + bias, atol=1e-10)


def test_terms_spanning_column_tiles_sum_into_their_home_slot():
    """A term over several column tiles leaves a partial product in each; every one but the first
    is added into the first, once."""
    hm = compressed(64, 64, tol=1e-3)
    plan = runtime.TilePlan.build(hm)
    tables = plan.tensors()
    slot_rank = plan.columns.slot_rank.reshape(-1)
    assert tables["extra_from"].numel() == int((slot_rank < plan.ranks).sum()) - plan.ranks > 0
    assert torch.equal(slot_rank[tables["extra_from"]], slot_rank[tables["extra_to"]])
    assert bool((tables["extra_to"] < tables["extra_from"]).all())
    assert not set(tables["extra_to"].tolist()) & set(tables["extra_from"].tolist())


@pytest.mark.parametrize("shape", [(64, 64), (45, 37)])  # bias fused into the product, or added after it
def test_hlinear_input_and_bias_gradients(shape):
    m, n = shape
    hm = compressed(m, n, tol=1e-3)
    assert ("out_index" in runtime.TilePlan.build(hm).tensors()) == (shape == (45, 37))
    layer = HLinear(hm, torch.randn(m))
    for batch in (1, 4, runtime.SMALL_BATCH + 1):  # all three layouts
        x = torch.randn(batch, n, requires_grad=True)
        weights = torch.randn(batch, m)
        layer.bias.grad = None
        (layer(x) * weights).sum().backward()
        assert torch.allclose(x.grad, weights @ hm.to_dense(torch.float32), atol=1e-4)
        assert torch.allclose(layer.bias.grad, weights.sum(0), atol=1e-5)


def test_hlinear_to():
    hm = compressed(30, 20, tol=1e-3)
    layer = HLinear(hm, torch.randn(30))
    double = layer.to(torch.float64)
    x64 = torch.randn(3, 20, dtype=torch.float64)
    assert torch.allclose(double(x64), x64 @ hm.to_dense(torch.float64).T + double.bias, atol=1e-10)
    assert layer.state_dict().keys() == {"bias"}


def test_matmul_refuses_wrong_shapes():
    hm = mixed_matrix()
    with pytest.raises(ValueError, match="cannot multiply"):
        hm.matmul(torch.randn(hm.shape[1] + 1))


def test_hlinear_zero_size_and_zero_blocks():
    layer = HLinear(pack(torch.zeros(3, 0), []))
    assert torch.equal(layer(torch.zeros(2, 0)), torch.zeros(2, 3))
    layer = HLinear(pack(torch.ones(3, 4), [(0, 0, 3, 4, ("zero",))]), torch.ones(3))
    assert torch.equal(layer(torch.randn(2, 4)), torch.ones(2, 3))


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16),
                         nn.Linear(16, 8, bias=False))


def test_patch_replaces_linears(model_file):
    _model, path, hms = model_file
    model = make_model()
    replaced = patch(model, path)
    assert replaced == ["0", "2", "4"]
    assert isinstance(model[0], CompactLinear) and isinstance(model[4], CompactLinear) and model[4].bias is None
    reference = make_model()
    reference.load_state_dict(load_state_dict(path))
    x = torch.randn(2, 3, 24)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    float_model = make_model()
    assert patch(float_model, path, mode="hmatrix") == ["0", "2", "4"]
    assert isinstance(float_model[0], HLinear) and float_model[4].bias is None
    assert torch.allclose(float_model(x), reference(x), atol=1e-5)
    dense_model = make_model()
    assert patch(dense_model, path, mode="dense") == []
    assert torch.allclose(dense_model(x), reference(x))


def test_patch_auto_keeps_the_faster_per_layer_and_says_so(model_file):
    _model, path, hms = model_file
    model = make_model()
    patched = patch(model, path, mode="auto", probe_batch=4)
    assert [c.name for c in patched.choices] == ["0", "2", "4"]
    for choice in patched.choices:  # compact layouts only, timed; never dense
        layer = model.get_submodule(choice.name)
        assert choice.mode == "compact" and isinstance(layer, CompactLinear)
        assert set(choice.seconds) == set(compact_layouts(hms[choice.name + ".weight"]))
        assert all(t > 0 for t in choice.seconds.values())
        assert choice.layout == min(choice.seconds, key=choice.seconds.get) == layer.layout
    assert patched == ["0", "2", "4"]
    reference = make_model()
    reference.load_state_dict(load_state_dict(path))
    x = torch.randn(7, 24)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        patch(make_model(), path, mode="fast")


def test_compact_factors_hold_fewer_bytes_and_compute_the_same():
    hm = compressed(96, 80, tol=3e-2)  # auto precision: integer codes
    assert any(codec.startswith("i") for codec in hm.pools)
    full, compact = HLinear(hm), HLinear(hm, keep_compact=True)
    assert compact.held_bytes < 0.6 * full.held_bytes
    x = torch.randn(5, 80)
    assert torch.equal(compact(x), full(x))
    assert "compact" in repr(compact)


@pytest.mark.slow
def test_hlinear_runs_under_torch_compile():
    hm = compressed(64, 48, tol=1e-3)
    layer = HLinear(hm, torch.randn(64))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for batch in (1, 3, runtime.SMALL_BATCH + 5):  # all three layouts
        x = torch.randn(batch, 48)
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_patch_checks_keys_and_keeps_missing_bias(tmp_path):
    model = make_model()
    state = model.state_dict()
    del state["0.bias"]
    path = tmp_path / "nobias.safetensors"
    hm = compress_matrix(state["0.weight"], CompressionOptions(tol=1e-2, leaf=4)).hmatrix
    write_compressed(path, {"0.weight": (hm, {"orig_shape": [40, 24], "stats": {}})},
                     {k: (v, "kept") for k, v in state.items() if k != "0.weight"}, HEADER)
    target = make_model()
    with torch.no_grad():
        target[0].bias.fill_(0.5)
    assert patch(target, path) == ["0"]
    assert torch.all(target[0].bias == 0.5)
    with pytest.raises(RuntimeError, match="missing keys"):
        patch(nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.LayerNorm(16),
                            nn.Linear(16, 8, bias=True)), path)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        patch(nn.Sequential(nn.Linear(24, 40)), path)


# ---------------------------------------------------------------------------------------------
# standalone


@pytest.mark.parametrize("module", SHIM_MODULES)
def test_runtime_modules_import_only_torch_safetensors_stdlib_and_each_other(module):
    import sys

    tree = ast.parse((pathlib.Path(runtime.__file__).parent / f"{module}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in runtime/{module}.py"
            if node.module.startswith("hmcompress."):
                assert node.module.startswith("hmcompress.runtime."), node.module
                assert node.module.removeprefix("hmcompress.runtime.") in SHIM_MODULES, node.module
                assert node in tree.body, "imports of other runtime modules stand at the top"
            else:
                roots.add(node.module.split(".")[0])
    allowed = {"torch", "safetensors"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed


# ---------------------------------------------------------------------------------------------
# properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), n=st.integers(1, 40), tol=st.sampled_from([0.0, 1e-3, 0.05, 0.5]),
       precision=st.sampled_from(["auto", "keep"]), leaf=st.sampled_from([2, 4, 8]), seed=st.integers(0, 99))
def test_hlinear_and_validate_on_library_matrices(m, n, tol, precision, leaf, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen) + 0.01 * torch.randn(m, n, generator=gen)
    hm = compress_matrix(w, CompressionOptions(tol=tol, precision=precision, leaf=leaf)).hmatrix
    hm.validate()
    layer = HLinear(hm, dtype=torch.float64)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen)
    dense = hm.to_dense(torch.float64)
    assert torch.allclose(layer(x), x @ dense.T, atol=1e-9)
    assert torch.allclose(hm @ x.T, dense @ x.T, atol=1e-9)
    assert torch.allclose(hm.matmul(x[0]), dense @ x[0], atol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_files_fail_cleanly(tmp_path_factory, data):
    """Flipping bytes anywhere gives a FormatError or a file that still validates, nothing else."""
    directory = tmp_path_factory.mktemp("corrupt")
    good = directory / "good.st"
    if not good.exists():
        write_compressed(good, {"w": (mixed_matrix(), {"orig_shape": [24, 20], "stats": {}})},
                         {"b": (torch.ones(3), "1-D")}, HEADER)
    raw = bytearray(good.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw) - 1) | st.integers(0, header_end - 1))
        raw[where] = data.draw(st.integers(0, 255))
    bad = directory / "bad.st"
    bad.write_bytes(bytes(raw))
    try:
        cf = read_file(bad)
    except FormatError as err:
        assert str(bad) in str(err)
    else:
        for hm in cf.matrices.values():
            hm.to_dense()
            HLinear(hm)(torch.ones(hm.shape[1]))
