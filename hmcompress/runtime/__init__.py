"""The runtime: everything needed to read and run a compressed file, on torch and safetensors alone.

Its modules, in dependency order: `errors` (`FormatError`), `format` (the vocabulary), `entropy`
(coded pools: checked and decoded), `validate`, `matrix` (`HMatrix`), `read` (files), `product`
(the tile product ``x @ Hᵀ``), `layers` (`HLinear`), `digits` (two-digit codes joined), `packed` (integer
bands packed by torch's quantized engine), `compact` (compact layers: what the file
stores, kept in memory) and `patching` (`patch`). They import nothing else of hmcompress, so
`bundle` can concatenate them into the single-file shim ``hmruntime.py`` that the writer puts
beside every compressed file.

Every public name of those modules can be imported from here (``from hmcompress.runtime import
HMatrix``); the modules load on first use, so that importing `hmcompress.runtime.errors` alone
does not load torch.
"""
from __future__ import annotations

import importlib

from hmcompress.runtime.bundle import SHIM_MODULES, public_names


def __getattr__(name: str) -> object:
    for module_name in SHIM_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        if not name.startswith("_") and name in vars(module):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *public_names()})
