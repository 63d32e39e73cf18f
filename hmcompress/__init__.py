"""hmcompress: error-bounded hierarchical-matrix compression of neural-network checkpoints.

The data flow, one subpackage a step (README "How it works" has the code map):

    io.checkpoint (load) -> core.build.compress_matrix (build, measure) -> io.writer (write)
        -> report (tables, pictures, pages) | runtime (the shim that loads and runs a file)

`api` holds the verbs a user calls (compress_checkpoint, verify, decompress, inspect) and `cli`
wires the command line to them. The public names below are imported on first use, so that
``hmcompress --help`` does not pay for torch.
"""
from __future__ import annotations

import importlib
import sys

from hmcompress import _moved

__version__ = "0.2.0"

_PUBLIC = {
    "compress_checkpoint": "hmcompress.api",
    "verify": "hmcompress.api",
    "decompress": "hmcompress.api",
    "inspect": "hmcompress.api",
    "compress_matrix": "hmcompress.core.build",
    "CompressionOptions": "hmcompress.core.build",
    "HMatrix": "hmcompress.runtime",
    "patch": "hmcompress.runtime",
    "load_state_dict": "hmcompress.runtime",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hmcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


sys.meta_path.append(_moved.MovedModules())
