"""The one exception the runtime raises for a bad file (beside `OSError` for I/O), free of torch
so that the library's error handling loads without it."""
from __future__ import annotations


class FormatError(ValueError):
    """A compressed file (or packed matrix) breaks the format; the message says where and how."""
