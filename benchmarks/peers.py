"""Peers (issue 18): hmcompress against the quantizers users would pick instead, at each one's own
measured error, matrix by matrix.

The matrices: every one that ``hmcompress compress`` compresses with default options in
../shared/checkpoints and in the sample models (as float32). Each peer configuration quantizes a
matrix with its own library on the CPU; its bytes are those of the tensors it keeps (codes,
scales, zero points, in the dtypes and packing it holds them: torchao's 4-bit intx layout keeps
one int8 a code); its error is measured, ‖W − dequantized‖_F / ‖W‖_F in float64. hmcompress then
compresses the matrix with ``--tol`` at that error (default options) and the file's bytes of the
matrix are counted. A peer that is not installed, or cannot run on the CPU, is skipped with the
reason printed; a matrix a peer refuses is left out of that peer's totals (counted).

Printed: per peer configuration, the bytes of both over the matrices it quantized, hmcompress /
peer, bits per weight of both, the checkpoints where hmcompress stores more, and the limit of any
memoryless coder at the peer's own errors as a share of the peer's bytes (the rate-distortion
figures below, at each matrix's peer error: no code that treats the entries as independent draws
stores less than the Shannon lower bound, so an hmcompress / peer ratio below it needs a code that
exploits the matrices' structure); then, at tol 1e-2,
hmcompress's bits per weight against the rate-distortion figures of the report (a Gaussian of
the entries' variance, Shannon's lower bound) over the same matrices.

Install the peers with ``pip install -e '.[peers]'``. Usage: python -m benchmarks.peers [--quick]
(--quick: the sample models only).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import print_table
from benchmarks.checkpoints import checkpoint_files
from benchmarks.compare import sample_model_files
from hmcompress.core.build import CompressionOptions, as_matrix, compress_matrix
from hmcompress.core.ratedistortion import rate_figures
from hmcompress.io.checkpoint import Selection, classify, open_checkpoint
from hmcompress.io.pipeline import one_thread

TOL = 1e-2  # the tolerance of the rate-distortion table
TARGET = 0.85  # the bar: hmcompress at most this share of every peer's bytes in total

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # W -> (dequantized W, bytes kept)


@dataclasses.dataclass
class Peer:
    name: str
    make: Callable[[], Quantizer]  # raises ImportError / RuntimeError where the peer cannot run


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly subclassed, nested) quantized tensor keeps: the sum over its inner tensors."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _meta = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def hqq(bits: int, group: int) -> Callable[[], Quantizer]:
    """HQQ's own quantizer (half-quadratic optimised zero points), float16 scales and zeros."""
    def make() -> Quantizer:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        def run(w: torch.Tensor) -> tuple[torch.Tensor, int]:
            layer = HQQLinear(linear(w), quant_config=BaseQuantizeConfig(nbits=bits, group_size=group),
                              compute_dtype=torch.float16, device="cpu", del_orig=True)
            kept = tensor_bytes(layer.W_q) + sum(tensor_bytes(v) for v in layer.meta.values() if torch.is_tensor(v))
            return layer.dequantize().float(), kept
        return run
    return make


def quanto(qtype: str) -> Callable[[], Quantizer]:
    """optimum-quanto's weight quantization, frozen (its default group size)."""
    def make() -> Quantizer:
        from optimum import quanto as q

        def run(w: torch.Tensor) -> tuple[torch.Tensor, int]:
            model = nn.Sequential(linear(w))
            q.quantize(model, weights=getattr(q, qtype))
            q.freeze(model)
            return model[0].weight.dequantize().float(), tensor_bytes(model[0].weight)
        return run
    return make


def torchao(config: Callable[[], object]) -> Callable[[], Quantizer]:
    """A torchao weight-only configuration applied with `quantize_`."""
    def make() -> Quantizer:
        from torchao.quantization import quantize_

        def run(w: torch.Tensor) -> tuple[torch.Tensor, int]:
            model = nn.Sequential(linear(w))
            quantize_(model, config())
            weight = model[0].weight
            if type(weight) in (torch.Tensor, nn.Parameter):
                raise RuntimeError("torchao left the weight in float (this configuration does not run on the CPU)")
            return weight.dequantize().float(), tensor_bytes(weight)
        return run
    return make


def int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def intx4_group32():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


PEERS = (
    Peer("HQQ 8-bit group 64", hqq(8, 64)),
    Peer("HQQ 8-bit group 128", hqq(8, 128)),
    Peer("HQQ 4-bit group 64", hqq(4, 64)),
    Peer("HQQ 2-bit group 64", hqq(2, 64)),
    Peer("optimum-quanto qint8", quanto("qint8")),
    Peer("optimum-quanto qint4", quanto("qint4")),
    Peer("torchao int8 weight-only", torchao(int8_weight_only)),
    Peer("torchao int4 intx group 32", torchao(intx4_group32)),
)


def checkpoints(quick: bool) -> list[pathlib.Path]:
    return ([] if quick else checkpoint_files()) + sample_model_files()


def matrices(path: pathlib.Path) -> list[tuple[str, torch.Tensor]]:
    """The matrices `compress` compresses with default options, as float32."""
    out = []
    for entry in open_checkpoint(path).entries:
        if classify(entry, Selection()) is None:
            out.append((entry.name, as_matrix(entry.load()).float()))
    return out


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    exact = w.double()
    return float(torch.linalg.matrix_norm(exact - approx.detach().double()) / torch.linalg.matrix_norm(exact))


@dataclasses.dataclass
class Tally:
    """One peer's totals: bytes of both over the matrices it quantized, entries, refusals, and the
    checkpoints where hmcompress stored more."""

    peer_bytes: int = 0
    ours: int = 0
    entries: int = 0
    refused: int = 0
    worse: list[str] = dataclasses.field(default_factory=list)
    gaussian_bits: float = 0.0  # the rate-distortion figures at the peer's errors, over its matrices
    lower_bits: float = 0.0


def compare(paths: list[pathlib.Path], quantizers: dict[str, Quantizer]) -> tuple[dict[str, Tally], list[list[str]]]:
    tallies = {name: Tally() for name in quantizers}
    rates = []  # (entries, stored bits, gaussian, lower) at TOL
    for path in paths:
        label = f"{path.parent.name}/{path.name}"
        per_checkpoint = {name: [0, 0] for name in quantizers}
        for _name, w in matrices(path):
            if torch.linalg.matrix_norm(w.double()) == 0 or not bool(torch.isfinite(w).all()):
                continue
            at_tol = compress_matrix(w, CompressionOptions(tol=TOL))
            gaussian, lower = rate_figures(w, at_tol.error ** 2 / w.numel())
            if gaussian is not None:
                rates.append((w.numel(), 8 * at_tol.hmatrix.nbytes, gaussian * w.numel(), lower * w.numel()))
            for name, quantize in quantizers.items():
                try:
                    approx, kept = quantize(w)
                except Exception:  # a shape or dtype the peer does not take
                    tallies[name].refused += 1
                    continue
                error = relative_error(w, approx)
                ours = compress_matrix(w, CompressionOptions(tol=error)).hmatrix.nbytes if error > 0 else w.numel() * 4
                tally = tallies[name]
                gaussian, lower = rate_figures(w, error ** 2 * float(w.double().square().sum()) / w.numel())
                tally.gaussian_bits += (32.0 if gaussian is None else gaussian) * w.numel()  # None: lossless
                tally.lower_bits += (32.0 if lower is None else lower) * w.numel()
                tally.peer_bytes += kept
                tally.ours += ours
                tally.entries += w.numel()
                per_checkpoint[name][0] += kept
                per_checkpoint[name][1] += ours
        for name, (kept, ours) in per_checkpoint.items():
            if ours > kept:
                tallies[name].worse.append(label)
    entries = sum(r[0] for r in rates)
    rate_rows = [[f"{len(rates)} matrices, {entries} entries, tol {TOL:g}", f"{sum(r[1] for r in rates) / entries:.3f}",
                  f"{sum(r[2] for r in rates) / entries:.3f}", f"{sum(r[3] for r in rates) / entries:.3f}",
                  f"{(sum(r[1] for r in rates) - sum(r[2] for r in rates)) / entries:+.3f}"]] if entries else []
    return tallies, rate_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the sample models only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    quantizers, skipped = {}, []
    for peer in PEERS:
        try:
            quantizer = peer.make()
            quantizer(torch.randn(64, 128))  # can it run here at all?
            quantizers[peer.name] = quantizer
        except Exception as err:  # not installed, or no CPU kernel
            skipped.append(f"{peer.name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    for line in skipped:
        print(line)
    paths = checkpoints(args.quick)
    with one_thread():
        tallies, rate_rows = compare(paths, quantizers)
    rows = []
    for name, t in tallies.items():
        if not t.entries:
            continue
        ratio = t.ours / t.peer_bytes
        rows.append([name, f"{t.peer_bytes}", f"{t.ours}", f"{ratio:.3f}", "yes" if ratio <= TARGET else "no",
                     f"{8 * t.peer_bytes / t.entries:.2f}", f"{8 * t.ours / t.entries:.2f}",
                     ", ".join(t.worse) or "none", str(t.refused), f"{t.gaussian_bits / (8 * t.peer_bytes):.3f}",
                     f"{t.lower_bits / (8 * t.peer_bytes):.3f}"])
    print_table(f"hmcompress at each peer's own measured error, per matrix ({len(paths)} checkpoints)",
                ["peer", "peer bytes", "hmcompress bytes", "hmcompress / peer", f"<= {TARGET}", "peer bits/weight",
                 "hmcompress bits/weight", "checkpoints where hmcompress stores more", "matrices refused",
                 "R(D) Gaussian / peer", "R(D) lower bound / peer"], rows)
    print()
    print_table("hmcompress bits per weight against the rate-distortion limit (entry-weighted means)",
                ["matrices", "stored bits/weight", "R(D) Gaussian", "R(D) lower bound", "stored - Gaussian"], rate_rows)


if __name__ == "__main__":
    main()
