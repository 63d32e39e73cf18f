"""hmcompress: error-bounded hierarchical-matrix compression of neural-network checkpoints."""
from __future__ import annotations

__version__ = "0.1.0"
