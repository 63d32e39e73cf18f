"""The runtime: everything needed to read and run a compressed file, on torch and safetensors alone.

Its modules, in dependency order: `format` (the vocabulary), `validate`, `matrix` (`HMatrix`),
`read` (files), `product` (the fast ``x @ Hᵀ``) and `layers` (`HLinear`, `patch`). They import
nothing else of hmcompress, so `bundle` can concatenate them into the single-file shim
``hmruntime.py`` that the writer puts beside every compressed file.
"""
from hmcompress.runtime.format import (BLOCK_COLUMNS, CODEC, CODEC_TABLE, CODECS, DENSE, DTYPE_TABLE, FORMAT_NAME,
                                       FORMAT_VERSION, INTEGER_CODECS, LOWRANK, MATRIX_DTYPE_NAMES, MATRIX_DTYPES,
                                       ROWS, SAFETENSORS_CODE, SAFETENSORS_DTYPES, SCALE_DTYPE, SEGMENT_COLUMNS,
                                       Codec, DType, FormatError, Kind, decode_rows, dense_nbytes, mask_bytes,
                                       mask_rows, pack_bits, pack_codes, row_mask, unpack_bits, unpack_codes)
from hmcompress.runtime.layers import (PATCH_MODES, HLinear, LayerChoice, Patched, compact_planes, decode_planes,
                                       patch)
from hmcompress.runtime.matrix import DenseSegment, HMatrix, LowRankSegment, RowsSegment, Segment
from hmcompress.runtime.product import SMALL_BATCH, TilePlan, terms, tile_product, tiles
from hmcompress.runtime.read import (MAX_HEADER_BYTES, CompressedFile, SafetensorsHeader, TensorInfo,
                                     hmatrix_from_tensors, load_state_dict, parse_metadata, read_file, read_header,
                                     unique_keys)
from hmcompress.runtime.validate import validate_packed

__all__ = [
    "BLOCK_COLUMNS", "CODEC", "CODEC_TABLE", "CODECS", "DENSE", "DTYPE_TABLE", "FORMAT_NAME", "FORMAT_VERSION",
    "INTEGER_CODECS", "LOWRANK", "MATRIX_DTYPE_NAMES", "MATRIX_DTYPES", "ROWS", "SAFETENSORS_CODE",
    "SAFETENSORS_DTYPES", "SCALE_DTYPE", "SEGMENT_COLUMNS", "Codec", "DType", "FormatError", "Kind", "decode_rows",
    "dense_nbytes", "mask_bytes", "mask_rows", "pack_bits", "pack_codes", "row_mask", "unpack_bits", "unpack_codes",
    "PATCH_MODES", "HLinear", "LayerChoice", "Patched", "compact_planes", "decode_planes", "patch",
    "DenseSegment", "HMatrix", "LowRankSegment", "RowsSegment", "Segment",
    "SMALL_BATCH", "TilePlan", "terms", "tile_product", "tiles",
    "MAX_HEADER_BYTES", "CompressedFile", "SafetensorsHeader", "TensorInfo", "hmatrix_from_tensors",
    "load_state_dict", "parse_metadata", "read_file", "read_header", "unique_keys", "validate_packed",
]
