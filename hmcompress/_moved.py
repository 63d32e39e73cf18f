"""Import paths of the flat layout (before version 0.2), kept working for one release.

``import hmcompress.build`` gives the very module ``hmcompress.core.build`` (so monkeypatching
either name patches both) and warns once with a `DeprecationWarning` naming the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "hmcompress.analysis": "hmcompress.evaluate.analysis",
    "hmcompress.baselines": "hmcompress.compare.baselines",
    "hmcompress.bounds": "hmcompress.core.bounds",
    "hmcompress.build": "hmcompress.core.build",
    "hmcompress.candidates": "hmcompress.core.candidates",
    "hmcompress.checkpoint": "hmcompress.io.checkpoint",
    "hmcompress.codecs": "hmcompress.core.codecs",
    "hmcompress.dynamic": "hmcompress.train.dynamic",
    "hmcompress.evaluation_report": "hmcompress.evaluate.tables",
    "hmcompress.finetune": "hmcompress.train.finetune",
    "hmcompress.nn": "hmcompress.train.layers",
    "hmcompress.pages": "hmcompress.report.pages",
    "hmcompress.picklescan": "hmcompress.io.picklescan",
    "hmcompress.pipeline": "hmcompress.io.pipeline",
    "hmcompress.plans": "hmcompress.core.plans",
    "hmcompress.plots": "hmcompress.report.plots",
    "hmcompress.recalibrate": "hmcompress.train.recalibrate",
    "hmcompress.stats": "hmcompress.core.stats",
    "hmcompress.verdicts": "hmcompress.core.verdicts",
    "hmcompress.writer": "hmcompress.io.writer",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module at its new path."""

    def find_spec(self, fullname: str, _path: object = None,
                  _target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, _spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # a placeholder; `exec_module` puts the real module in its place

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds under the name after this call.
        sys.modules[module.__name__] = importlib.import_module(new)
