"""Small builders of packed matrices and compressed files for the runtime and writer tests."""
from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
import reference_decoder
import torch

from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.core.packer import Packer
from hmcompress.io.writer import write_compressed
from hmcompress.runtime import DENSE, LOWRANK, ROWS, HMatrix, row_mask


def pack(matrix: torch.Tensor, leaves: list[tuple[int, int, int, int, tuple]]) -> HMatrix:
    """Pack ``matrix`` with the given leaf rectangles ``(row0, col0, rows, cols, spec)``.

    ``spec``: ``("dense", codec)``, ``("lowrank", [(codec, rank), ...])`` (the block's truncated
    SVD split into consecutive rank slices, one per codec), ``("rows", [(codec, [row, ...]), ...])``
    or ``("zero",)``.
    """
    work = matrix.double()
    packer = Packer()
    blocks = []
    for index, (r0, c0, h, w, spec) in enumerate(leaves):
        blocks.append([r0, c0, h, w, 1])
        block = work[r0:r0 + h, c0:c0 + w]
        if spec[0] == "dense":
            packer.add(index, DENSE, spec[1], 0, [block])
        elif spec[0] == "lowrank":
            u, s, vh = torch.linalg.svd(block, full_matrices=False)
            root = s.sqrt()
            a, b = (u * root).T, vh * root.unsqueeze(1)
            start = 0
            for codec, rank in spec[1]:
                packer.add(index, LOWRANK, codec, rank, [a[start:start + rank], b[start:start + rank]])
                start += rank
        elif spec[0] == "rows":
            for codec, rows in spec[1]:
                keep = torch.tensor(sorted(rows))
                packer.add(index, ROWS, codec, len(rows), [block[keep]])
                packer.row_masks.append(row_mask(keep, h))
        else:
            assert spec[0] == "zero"
    return packer.finish(tuple(matrix.shape), matrix.dtype, blocks)


def mixed_matrix(m: int = 24, n: int = 20, dtype: torch.dtype = torch.float32, seed: int = 0) -> HMatrix:
    """An m x n matrix (m >= 16, n >= 12) using every kind of segment and several codecs."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    return pack(w, [
        (0, 0, 8, 12, ("dense", "f32")),
        (0, 12, 8, n - 12, ("lowrank", [("f16", 2), ("i8", 3), ("u8", 1)])),
        (8, 0, 8, 6, ("rows", [("i4", [0, 3]), ("u8", [1, 2]), ("bf16", [5, 7])])),
        (8, 6, 8, 6, ("dense", "i7")),
        (8, 12, 8, n - 12, ("zero",)),
        (16, 0, m - 16, n, ("lowrank", [("i5", 4), ("i6", 1), ("f64", 2)])),
    ])


def compressed(m: int, n: int, tol: float = 1e-2, dtype: torch.dtype = torch.float32, seed: int = 0) -> HMatrix:
    """A matrix compressed by the library's planner (smooth kernel plus noise: dense and low-rank leaves)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(m, generator=gen, dtype=torch.float64))[0]
    y = torch.sort(torch.rand(n, generator=gen, dtype=torch.float64))[0]
    w = 1 / (1 + 100 * (x[:, None] - y[None, :]).abs()) + 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return compress_matrix(w.to(dtype), CompressionOptions(tol=tol, precision="auto", leaf=8), planned_only=True).hmatrix


HEADER = {"options": {"tol": 0.01}, "source": {"file": "model.pt"}, "extra": {"epoch": 3}}


def write_model_file(path: pathlib.Path, model: torch.nn.Module, compress: set[str], tol: float = 1e-2,
                     **kwargs) -> dict[str, HMatrix]:
    """Compress the named 2-D tensors of ``model``'s state dict, pass the rest through; write."""
    matrices, passthrough = {}, {}
    for name, tensor in model.state_dict().items():
        if name in compress:
            matrix = tensor.reshape(tensor.shape[0], -1)
            hm = compress_matrix(matrix, CompressionOptions(tol=tol, leaf=4)).hmatrix
            matrices[name] = (hm, {"orig_shape": list(tensor.shape), "stats": {"name": name}})
        else:
            passthrough[name] = (tensor, "not selected")
    write_compressed(path, matrices, passthrough, HEADER, **kwargs)
    return {name: hm for name, (hm, _info) in matrices.items()}


BITS_VIEW = {torch.float64: (torch.int64, np.uint64), torch.float32: (torch.int32, np.uint32),
             torch.float16: (torch.int16, np.uint16), torch.bfloat16: (torch.int16, np.uint16)}


def bits(tensor: torch.Tensor) -> np.ndarray:
    """A floating tensor's bit patterns (unsigned integers of its width): equal bits, equal values
    (-0 and +0, and every NaN, told apart)."""
    signed, unsigned = BITS_VIEW[tensor.dtype]
    return tensor.detach().contiguous().view(signed).numpy().view(unsigned)


def reference_decoded(hm: HMatrix, orig_shape: list[int] | None = None) -> reference_decoder.Matrix:
    """``hm`` written to a file by the library and decoded by the independent reference decoder."""
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "m.hm.safetensors"
        write_compressed(path, {"m": (hm, {"orig_shape": orig_shape or list(hm.shape), "stats": {}})}, {}, HEADER)
        return reference_decoder.decode_file(path).matrices["m"]


def files_under(directory: pathlib.Path) -> set[pathlib.Path]:
    """Every file and folder below ``directory``, relative to it."""
    return {p.relative_to(directory) for p in directory.rglob("*")}


def compress_result(stdout: str) -> dict:
    """The one input's result in a `compress --json` document, the document's shape checked."""
    document = json.loads(stdout)
    assert set(document) == {"ok", "results"}, document.keys()
    (result,) = document["results"]
    assert document["ok"] is result["ok"]
    return result


def random_checkpoint(path: pathlib.Path, count: int, side: int, seed: int = 0) -> pathlib.Path:
    """A safetensors checkpoint of ``count`` random ``side x side`` float32 matrices ``layer{i}.weight``."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file({f"layer{i}.weight": torch.randn(side, side, generator=gen) for i in range(count)}, str(path))
    return path
