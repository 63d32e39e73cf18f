"""Reading a calibration stats file (`hmcompress calibrate`; docs/FORMAT.md, "Calibration statistics").

`ActivationStats.open` checks the whole header at once (a safetensors file whose metadata
``hmcompress_stats`` names exactly its tensors, each a square float64 matrix) and reads no tensor;
`ActivationStats.gram` loads one layer's G and checks it (finite, exactly symmetric, positive
semi-definite within rounding, not zero). Nothing is ever unpickled. Every problem is one line of
`UserError` that starts with the file's path.
"""
from __future__ import annotations

import json
import os
import pathlib

import torch

from hmcompress.core.weighted import InputWeights
from hmcompress.errors import UserError

STATS_KEY = "hmcompress_stats"  # the metadata key of a stats file
STATS_FORMAT = 1
PSD_SLACK = 8  # G's smallest eigenvalue may be as low as -n * eps * PSD_SLACK * its largest
MAX_COUNT = 2**53  # sample and batch counts: whole numbers float64 holds exactly
# G's largest diagonal entry (the mean square of the most excited input) lies within these: a
# float32 weight's square (1e-90 to 1e77) times it, summed, stays a normal float64.
GRAM_SCALE = (1e-150, 1e150)


def _count(value: object) -> int | None:
    """``value`` if it is a positive int (not a bool) that float64 holds exactly, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT else None


class ActivationStats:
    """A checked stats file: per layer (the weight's name), G's size, the number of input
    vectors N and batches; G itself is read on demand by `gram`."""

    def __init__(self, path: pathlib.Path, sizes: dict[str, int], samples: dict[str, int],
                 batches: dict[str, int], source: dict) -> None:
        self.path = path
        self._sizes, self._samples, self._batches = sizes, samples, batches
        self.source = source
        self.names: list[str] = sorted(sizes)

    def _fail(self, problem: str) -> UserError:
        return UserError(f"{self.path}: {problem}")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStats":
        """Open and check ``path``'s header (no tensor is read)."""
        from safetensors import safe_open

        path = pathlib.Path(path)

        def fail(problem: str) -> UserError:
            return UserError(f"{path}: {problem}")

        if not path.is_file():
            raise fail("no such file" if not path.exists() else "is not a file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                shapes = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors' errors have no common base worth naming
            raise fail(f"not a readable safetensors file ({' '.join(str(err).split())})") from err
        if STATS_KEY not in metadata:
            raise fail(f"not a calibration stats file (no {STATS_KEY!r} metadata; make one with hmcompress calibrate)")
        try:
            header = json.loads(metadata[STATS_KEY])
        except (ValueError, RecursionError) as err:
            raise fail(f"{STATS_KEY!r} metadata is not valid JSON ({' '.join(str(err).split())[:200]})") from err
        if not isinstance(header, dict):
            raise fail(f"{STATS_KEY!r} metadata is not a JSON object")
        if type(header.get("format")) is not int or header["format"] != STATS_FORMAT:
            raise fail(f"stats format {header.get('format')!r} is not supported (this version reads format "
                       f"{STATS_FORMAT})")
        layers, source = header.get("layers"), header.get("source", {})
        if not isinstance(layers, dict) or not layers:
            raise fail(f"{STATS_KEY!r} metadata has no layers")
        if not isinstance(source, dict):
            raise fail(f"{STATS_KEY!r} metadata: 'source' is not a JSON object")
        if missing := sorted(set(layers) - set(shapes)):
            raise fail(f"layer {missing[0]!r} of the metadata has no tensor")
        if extra := sorted(set(shapes) - set(layers)):
            raise fail(f"tensor {extra[0]!r} is not a layer of the metadata")
        sizes, samples, batches = {}, {}, {}
        for name in sorted(layers):
            shape, dtype = shapes[name]
            if dtype != "F64" or len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
                raise fail(f"layer {name!r}: G must be a square float64 matrix, not {dtype} "
                           f"{'x'.join(map(str, shape)) or 'scalar'}")
            entry = layers[name]
            if not isinstance(entry, dict) or _count(entry.get("samples")) is None:
                raise fail(f"layer {name!r}: 'samples' must be a whole number from 1 to 2**53")
            if _count(entry.get("batches")) is None:
                raise fail(f"layer {name!r}: 'batches' must be a whole number from 1 to 2**53")
            sizes[name], samples[name], batches[name] = shape[0], entry["samples"], entry["batches"]
        return cls(path, sizes, samples, batches, source)

    def _known(self, name: str) -> None:
        if name not in self._sizes:
            raise self._fail(f"has no layer {name!r}")

    def size(self, name: str) -> int:
        """n: the length of the layer's input vectors (G is n x n)."""
        self._known(name)
        return self._sizes[name]

    def samples(self, name: str) -> int:
        """N: the number of input vectors G averages over."""
        self._known(name)
        return self._samples[name]

    def batches(self, name: str) -> int:
        """The number of batches in which the layer was called."""
        self._known(name)
        return self._batches[name]

    def _load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        self._known(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise self._fail(f"layer {name!r}: cannot be read ({' '.join(str(err).split())})") from err
        n = self._sizes[name]
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != (n, n):
            raise self._fail(f"layer {name!r}: changed since it was opened")
        return tensor

    def gram(self, name: str, checked: bool = True) -> torch.Tensor:
        """The layer's G = X Xᵀ / N (float64, n x n), checked: finite, exactly symmetric, with a
        non-negative diagonal and a positive trace, positive semi-definite within rounding
        (``checked=False``: as stored, for a file whose G were checked when the run began)."""
        g = self._load(name)
        if not checked:
            return g
        n = g.shape[0]

        def fail(problem: str) -> UserError:
            return self._fail(f"layer {name!r}: {problem}")

        if not bool(torch.isfinite(g).all()):
            raise fail("G has NaN or Inf")
        if not torch.equal(g, g.T):
            raise fail("G is not symmetric")
        diagonal = g.diagonal()
        if bool((diagonal < 0).any()):
            raise fail(f"G has a negative diagonal entry ({float(diagonal.min()):.2e}), so it is no second moment")
        if float(diagonal.sum()) <= 0:
            if not bool(g.any()):
                raise fail("G is zero: no input reached the layer")
            raise fail("G has a zero diagonal but non-zero entries, so it is no second moment")
        largest = float(diagonal.max())
        if not GRAM_SCALE[0] <= largest <= GRAM_SCALE[1]:  # weighted errors would under- or overflow
            raise fail(f"G's largest diagonal entry {largest:.1e} lies outside {GRAM_SCALE[0]:g} to "
                       f"{GRAM_SCALE[1]:g} (inputs of that size say nothing a float64 error can hold)")
        # G + δI positive definite (its Cholesky factor exists) with δ no larger than the slack
        # allowed below (the trace bounds the largest eigenvalue) settles it; eigenvalues only
        # for a G that fails, to say by how much.
        shift = n * 2.0**-52 * PSD_SLACK * float(diagonal.sum()) / 4
        if int(torch.linalg.cholesky_ex(g + shift * torch.eye(n, dtype=g.dtype)).info) == 0:
            return g
        eigenvalues = torch.linalg.eigvalsh(g)
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        if smallest < -n * 2.0**-52 * PSD_SLACK * largest:
            raise fail(f"its input second moment G is not positive semi-definite (smallest eigenvalue "
                       f"{smallest:.1e}, largest {largest:.1e})")
        return g

    def weights(self, name: str, checked: bool = True) -> InputWeights:
        """The layer's G and N as the builder takes them (``checked``: as for `gram`)."""
        return InputWeights(self.gram(name, checked), self.samples(name))

    def digest(self, name: str) -> str:
        """Identifies the layer's G as stored (`InputWeights.digest`: what result keys use)."""
        return InputWeights(self._load(name), self.samples(name)).digest()

    def check_against(self, matrices: dict[str, tuple[int, int]], checkpoint: object = "the checkpoint") -> None:
        """Refuse stats that do not belong to a checkpoint whose matrices are ``matrices`` (name ->
        (m, n), conv kernels as out x in*k*k): a layer that is not among them, or whose input
        size is not n (so at least one layer is shared: a file has layers). ``matrices`` should hold every tensor that is a
        matrix of the checkpoint, whatever the size filters, since a stats file covers every
        layer the model ran. Matrices without stats are fine (the plain weight bound applies)."""
        for name in self.names:
            if name not in matrices:
                raise self._fail(f"the stats file is for another model: {name!r} is not a compressible matrix "
                                 f"of {checkpoint}")
            columns = matrices[name][1]
            if columns != self._sizes[name]:
                raise self._fail(f"{name!r} has inputs of size {self._sizes[name]} in the stats file but the "
                                 f"matrix has {columns} columns")
