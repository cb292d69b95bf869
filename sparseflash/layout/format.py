"""The .sflash layout file format: the contract between the layout generator and the runtime.

One file holds everything the runtime needs: a 128-byte preamble, resident tensors, one
4096-aligned region of neuron bundles per FFN layer, a JSON header (caller metadata) and a
JSON index. Spec: docs/layout-format.md. This module only gathers the public names:

- format_spec.py    constants, errors, typed records (TensorEntry, FfnLayer, ChunkTable)
- format_index.py   index JSON encoding and the structural validator
- format_reader.py  LayoutFile (open, validate, read tensors and bundles, verify)
- format_writer.py  LayoutWriter (declare, plan, write atomically)
- format_extents.py which aligned blocks hold a set of neurons (reads, their cost without a disk)

What the tensors and bundles of a *model* layout mean is layout/schema.py, on top of this.

It imports nothing else from sparseflash.
"""

from .format_reader import LayoutFile, VerifyReport, check_digests
from .format_spec import (
    ALIGNMENT,
    CODECS,
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    MAGIC,
    MAX_D_MODEL,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_LAYERS,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NEURONS,
    MAX_TENSORS,
    PREAMBLE_SIZE,
    QUANT_TYPES,
    STORAGE_DTYPES,
    TENSOR_ALIGNMENT,
    TENSOR_TYPES,
    VERSION,
    Chunk,
    ChunkTable,
    FfnLayer,
    LayoutChecksumError,
    LayoutError,
    LayoutTruncatedError,
    LayoutVersionError,
    Preamble,
    TensorEntry,
    itemsize,
    numpy_dtype,
    record_digests,
    tensor_nbytes,
)
from .format_writer import LayoutPlan, LayoutWriter, is_temp_name, temp_path_for

__all__ = [
    "ALIGNMENT", "CODECS", "DEFAULT_CHUNK_BYTES", "DTYPES", "MAGIC", "MAX_D_MODEL", "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES", "MAX_LAYERS", "MAX_NAME_BYTES", "MAX_NDIM", "MAX_NEURONS", "MAX_TENSORS",
    "PREAMBLE_SIZE", "QUANT_TYPES", "STORAGE_DTYPES", "TENSOR_ALIGNMENT", "TENSOR_TYPES", "VERSION",
    "Chunk", "ChunkTable", "FfnLayer", "LayoutChecksumError", "LayoutError", "LayoutFile", "LayoutPlan",
    "LayoutTruncatedError", "LayoutVersionError", "LayoutWriter", "Preamble", "TensorEntry", "VerifyReport",
    "check_digests", "is_temp_name", "itemsize", "numpy_dtype", "record_digests", "temp_path_for", "tensor_nbytes",
]
