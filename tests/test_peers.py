"""benchmarks.peers counts what each peer quantizer keeps and measures its error (issue 18): the
bytes of known layouts, an error a quantizer of that width can have, and hmcompress compared at
that error. A peer whose library is missing is skipped."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.peers import PEERS, relative_error, tensor_bytes

# Bytes each configuration keeps for a 64 x 128 matrix (8192 entries), by its layout.
EXPECTED_BYTES = {
    "HQQ 8-bit group 64": 8192 + 128 * 2 * 2,  # a byte a code, float16 scale and zero a group
    "HQQ 8-bit group 128": 8192 + 64 * 2 * 2,
    "HQQ 4-bit group 64": 4096 + 128 * 2 * 2,
    "HQQ 2-bit group 64": 2048 + 128 * 2 * 2,
    "optimum-quanto qint8": 8192 + 64 * 4,  # a float32 scale a row
    "torchao int8 weight-only": None,  # its scale and zero-point layout varies by version: only bounded
}
BITS = {"HQQ 8-bit group 64": 8, "HQQ 8-bit group 128": 8, "HQQ 4-bit group 64": 4, "HQQ 2-bit group 64": 2,
        "optimum-quanto qint8": 8, "optimum-quanto qint4": 4, "torchao int8 weight-only": 8,
        "torchao int4 intx group 32": 4}
LIBRARIES = {"HQQ": "hqq", "optimum-quanto": "optimum.quanto", "torchao": "torchao"}


def installed(peer_name: str) -> bool:
    library = next(lib for prefix, lib in LIBRARIES.items() if peer_name.startswith(prefix))
    try:
        return importlib.util.find_spec(library) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_each_peer_keeps_its_layouts_bytes_at_a_plausible_error(peer):
    if not installed(peer.name):
        pytest.skip(f"{peer.name}: its library is not installed (pip install -e '.[peers]')")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    try:
        approx, kept = peer.make()(w)
    except RuntimeError as err:  # a configuration with no CPU kernel in this version
        pytest.skip(str(err))
    bits = BITS[peer.name]
    error = relative_error(w, approx)
    assert approx.shape == w.shape
    # A uniform quantizer of 2^bits levels over a Gaussian group's range of a few standard deviations:
    # relative error about sqrt(3) / (2^bits - 1).
    assert 0.2 / (2**bits - 1) < error < 2.5 / (2**bits - 1)
    expected = EXPECTED_BYTES.get(peer.name)
    if expected is not None:
        assert kept == expected
    assert w.numel() * bits / 8 <= kept <= w.numel() * 1.5 * max(bits, 8) / 8


def test_tensor_bytes_of_plain_and_nested_tensors():
    assert tensor_bytes(torch.zeros(3, 5, dtype=torch.int8)) == 15
    assert tensor_bytes(torch.nn.Parameter(torch.zeros(4))) == 16
