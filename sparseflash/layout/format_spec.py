"""Constants, errors and typed records of the .sflash layout file format.

The byte-level specification is docs/layout-format.md; this module is its executable half.
Reader (format_reader.py) and writer (format_writer.py) share everything defined here.
Imports nothing from the rest of sparseflash.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import xxhash

MAGIC = b"SFLASH\x00\x01"  # never changes between versions; the version is its own field
VERSION = 2  # 2: quantized types q8/q4, a digest of every FFN record in the index
PREAMBLE_SIZE = 128
ALIGNMENT = 4096  # FFN regions start here, and their padded end is a multiple of it (O_DIRECT reads)
TENSOR_ALIGNMENT = 64  # resident tensors, the JSON header and the index
DEFAULT_CHUNK_BYTES = 128 * 1024  # writer's target raw bytes per chunk

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 65536
MAX_LAYERS = 1024
MAX_NEURONS = 1 << 24  # per FFN layer
MAX_D_MODEL = 1 << 16
MAX_NDIM = 8
MAX_NAME_BYTES = 1024
MAX_I64 = (1 << 63) - 1

TEMP_INFIX = ".tmp-"  # the writer's temp file for "x.sflash" is ".x.sflash.tmp-<pid>"

# Tag -> little-endian numpy dtype. bf16 is carried as its raw uint16 bits.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
    "u16": np.dtype("<u2"),
    "u32": np.dtype("<u4"),
}
# Quantized types: values in groups along the last dimension, stored as bytes (GGUF Q8_0 / Q4_0
# arithmetic; the byte layout inside a row is the model contract's, layout/schema.py).
# Tag -> (values per group, bytes per group).
QUANT_TYPES: dict[str, tuple[int, int]] = {"q8": (32, 34), "q4": (32, 18)}
TENSOR_TYPES = (*DTYPES, *QUANT_TYPES)
STORAGE_DTYPES = ("f32", "f16", "bf16", "q8", "q4")  # allowed for FFN records
CODECS = ("none", "zstd")  # a chunk's codec; index into this tuple is ChunkTable.codec
CODEC_NONE, CODEC_ZSTD = 0, 1

# Preamble: magic, version, flags, file_size, header_offset, header_length, index_offset,
# index_length, header_crc32, index_crc32, reserved (zero), then preamble_crc32 of bytes [0, 124).
PREAMBLE_STRUCT = struct.Struct("<8sIIQQQQQII60s")
PREAMBLE_CRC_STRUCT = struct.Struct("<I")
assert PREAMBLE_STRUCT.size + PREAMBLE_CRC_STRUCT.size == PREAMBLE_SIZE


class LayoutError(ValueError):
    """A layout file (or a writer's input) breaks the format; names the file, the field and the value."""

    def __init__(self, path: object, field: str, problem: str, value: object = ...):
        self.path, self.field, self.problem, self.value = str(path), field, problem, value
        shown = "" if value is ... else f" (got {_short_repr(value)})"
        super().__init__(f"{self.path}: {field}: {problem}{shown}")


class LayoutVersionError(LayoutError):
    """The file is a layout file of a version this reader does not implement."""


class LayoutChecksumError(LayoutError):
    """A crc32 does not match: the bytes on disk are not the bytes that were written."""


class LayoutTruncatedError(LayoutError):
    """The file is shorter than its preamble says (an interrupted copy or download)."""


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)  # repr escapes newlines, so the message stays on one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def itemsize(tag: str) -> int:
    """Bytes per stored element: a quantized type is stored (and read) as bytes."""
    return 1 if tag in QUANT_TYPES else DTYPES[tag].itemsize


def numpy_dtype(tag: str) -> np.dtype:
    """The numpy dtype a tensor or record of type ``tag`` is read as (uint8 for quantized types)."""
    return np.dtype("u1") if tag in QUANT_TYPES else DTYPES[tag]


def tensor_nbytes(tag: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of logical ``shape``; None when a quantized type cannot have that shape
    (its last dimension must be a multiple of the group size)."""
    if tag not in QUANT_TYPES:
        return math.prod(shape) * DTYPES[tag].itemsize
    group, group_bytes = QUANT_TYPES[tag]
    if not shape or shape[-1] % group:
        return None
    return math.prod(shape[:-1]) * (shape[-1] // group) * group_bytes


def stored_shape(tag: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor is read as: its logical shape, or (..., bytes per row) when quantized."""
    if tag not in QUANT_TYPES:
        return tuple(shape)
    group, group_bytes = QUANT_TYPES[tag]
    return (*shape[:-1], shape[-1] // group * group_bytes)


def record_digests(rows: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """xxh3_64 of each row's bytes (rows: (n, ...) any dtype, C-contiguous per row) as uint64 (n,); with
    ``index``, of rows[index[i]] in turn (len(index),), read in place (no gathered copy)."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
    picked = flat if index is None else (flat[int(i)] for i in index)
    count = len(flat) if index is None else len(index)
    return np.fromiter((xxhash.xxh3_64_intdigest(row) for row in picked), dtype=np.uint64, count=count)


def align_up(offset: int, alignment: int) -> int:
    """Smallest multiple of `alignment` that is >= `offset` (bytes)."""
    return -(-offset // alignment) * alignment


def crc32(buffer, value: int = 0) -> int:
    """zlib crc32 (the one in PNG and gzip) of `buffer`, continuing from `value`."""
    return zlib.crc32(buffer, value) & 0xFFFFFFFF


class Preamble(NamedTuple):
    """The fixed 128 bytes at offset 0; every offset and length is in bytes."""

    version: int
    flags: int
    file_size: int
    header_offset: int
    header_length: int
    index_offset: int
    index_length: int
    header_crc32: int
    index_crc32: int

    def pack(self) -> bytes:
        body = PREAMBLE_STRUCT.pack(MAGIC, *self, bytes(60))
        return body + PREAMBLE_CRC_STRUCT.pack(crc32(body))


@dataclass(frozen=True)
class TensorEntry:
    """A resident tensor: `nbytes` bytes at file `offset`, little-endian `dtype` tag, C order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return stored_shape(self.dtype, self.shape)


class Chunk(NamedTuple):
    """One chunk of an FFN region: neurons [first_neuron, first_neuron + n_neurons)."""

    first_neuron: int
    n_neurons: int
    offset: int
    stored_length: int
    raw_length: int
    crc32: int
    codec: str


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """Columns of a layer's chunk table (read-only int64 arrays; codec indexes CODECS)."""

    offset: np.ndarray
    stored_length: np.ndarray
    raw_length: np.ndarray
    crc32: np.ndarray
    codec: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.offset)


@dataclass(frozen=True, eq=False)
class FfnLayer:
    """Index record of one FFN layer; neurons are in stored order (see `permutation`)."""

    index: int
    d_model: int
    n_neurons: int
    gated: bool
    dtype: str  # storage dtype tag, one of STORAGE_DTYPES
    bundle_bytes: int  # bytes of one neuron's record (its bundle), a multiple of the dtype's itemsize
    offset: int  # region start in the file, multiple of ALIGNMENT
    length: int  # stored bytes of the region (sum of chunk stored lengths)
    n_hot: int  # stored positions [0, n_hot) form the hot region
    threshold: float
    permutation: str  # name of the int32 tensor: stored position -> original neuron id
    chunk_neurons: int  # neurons per chunk (the last chunk may hold fewer)
    chunks: ChunkTable
    digests: np.ndarray  # uint64 (n_neurons,): xxh3_64 of each record's raw bytes, stored order

    @property
    def bundle_len(self) -> int:
        """Elements of the storage dtype in one neuron's record (what the bytes mean: layout/schema.py)."""
        return self.bundle_bytes // itemsize(self.dtype)

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def compressed(self) -> bool:
        """True if any chunk is zstd; then neurons are reachable only by whole chunks."""
        return bool(np.any(self.chunks.codec != CODEC_NONE))

    def chunk(self, k: int) -> Chunk:
        """Chunk k as a record; raises IndexError outside [0, len(chunks))."""
        if not 0 <= k < len(self.chunks):
            raise IndexError(f"layer {self.index}: chunk {k} out of range [0, {len(self.chunks)})")
        first = k * self.chunk_neurons
        t = self.chunks
        return Chunk(first, min(self.chunk_neurons, self.n_neurons - first), int(t.offset[k]),
                     int(t.stored_length[k]), int(t.raw_length[k]), int(t.crc32[k]), CODECS[t.codec[k]])
