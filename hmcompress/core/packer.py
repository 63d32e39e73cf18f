"""Packing encoded segments into an `HMatrix`: pools, scales, the segment table, row bitmaps."""
from __future__ import annotations

import torch

from hmcompress.core.codecs import encode_rows, segment_step
from hmcompress.core.feedback import Feedback
from hmcompress.runtime import BLOCK_COLUMNS, CODEC, SEGMENT_COLUMNS, HMatrix


class Packer:
    """Appends encoded rows to per-codec pools and records segment table rows."""

    def __init__(self) -> None:
        self.pools: dict[str, list[torch.Tensor]] = {}
        self.scales: dict[str, list[torch.Tensor]] = {}
        self.lengths: dict[str, int] = {}
        self.scale_lengths: dict[str, int] = {}
        self.segments: list[list[int]] = []
        self.row_masks: list[torch.Tensor] = []

    def add(self, block: int, kind: int, codec: str, rank: int, rows: list[torch.Tensor],
            feedback: Feedback | None = None, step: float | None = None) -> None:
        """Encode a segment's rows (``feedback``, ``step``: as in `encode_rows`; a codec with one
        scale a segment stores it once, by default `segment_step` of all its rows)."""
        offset = self.lengths.get(codec, 0)
        scale_offset = self.scale_lengths.get(codec, 0) if CODEC[codec].integer else -1
        one_scale = CODEC[codec].segment_scale
        if one_scale and step is None:
            step = segment_step(codec, rows)
        for index, part in enumerate(rows):
            data, scales = encode_rows(codec, part, feedback, step)
            self.pools.setdefault(codec, []).append(data)
            self.lengths[codec] = self.lengths.get(codec, 0) + data.numel()
            if scales is not None and not (one_scale and index):
                self.scales.setdefault(codec, []).append(scales)
                self.scale_lengths[codec] = self.scale_lengths.get(codec, 0) + scales.numel()
        self.segments.append([block, int(kind), CODEC[codec].id, rank, offset, scale_offset])

    def finish(self, shape: tuple[int, int], dtype: torch.dtype, blocks: list[list[int]]) -> HMatrix:
        return HMatrix(
            shape, dtype,
            torch.tensor(blocks, dtype=torch.int32).reshape(-1, BLOCK_COLUMNS),
            torch.tensor(self.segments, dtype=torch.int32).reshape(-1, SEGMENT_COLUMNS),
            {c: torch.cat(parts) for c, parts in sorted(self.pools.items())},
            {c: torch.cat(parts) for c, parts in sorted(self.scales.items())},
            torch.cat(self.row_masks) if self.row_masks else torch.zeros(0, dtype=torch.uint8),
        )
