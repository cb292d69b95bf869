"""GGUF structure check: walk the header of a .gguf file with bounds checks before anything parses it.

gguf.GGUFReader trusts the counts and lengths it reads: an absurd array length makes it loop
without advancing (a hang), a truncated header makes it fail with IndexError deep inside numpy.
``check_gguf_file`` walks the same header with ``struct`` over a memory map, checking every count
and length against the bytes that remain, every type code against the known ones, and every
tensor extent against the data section, so that GGUFReader only ever sees a well-formed file.

Layout (little-endian, version 2 or 3):
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, dims u64 x n_dims, ggml_type u32, offset u64)
    padding to ``general.alignment`` (default 32) | tensor data (offsets relative to here)
A string is a u64 byte length followed by UTF-8 bytes; an array is item_type u32, count u64, items.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sparseflash.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type code -> (name, struct format); strings and arrays are variable-sized
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
STRING, ARRAY = 8, 9


class GGUFFormatError(CheckpointError):
    """A .gguf file is truncated, corrupt or not a GGUF file at all."""


@dataclass(frozen=True)
class TensorExtent:
    """Where one tensor's bytes live, as declared by its tensor-info record."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # GGUF order: ne[0] (the contiguous dimension) first
    start: int  # absolute file offset, bytes
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """The checked header: version, key count and tensor extents."""

    version: int
    kv_count: int
    alignment: int
    data_offset: int  # absolute offset of the tensor data section, bytes
    tensors: tuple[TensorExtent, ...]


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.size, self.pos, self.path = buf, len(buf), 0, path

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what}; the file is truncated or not a valid GGUF file")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but only {self.size - self.pos} remain")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"length of {what}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_value(self, vtype: int, key: str) -> None:
        if vtype == STRING:
            length = self.unpack("<Q", f"length of string value of {key!r}")
            self.need(length, f"string value of {key!r}")
            self.pos += length
        elif vtype == ARRAY:
            itype = self.unpack("<I", f"item type of array {key!r}")
            count = self.unpack("<Q", f"length of array {key!r}")
            if itype not in VALUE_TYPES or itype == ARRAY:
                raise self.fail(f"array {key!r} has item type {itype}, which GGUF readers do not support")
            if itype == STRING:
                self.need(8 * count, f"{count} strings of array {key!r}")  # each at least its length field
                for _ in range(count):
                    self.skip_value(STRING, key)
            else:
                self.need(count * struct.calcsize(VALUE_TYPES[itype][1]), f"{count} items of array {key!r}")
                self.pos += count * struct.calcsize(VALUE_TYPES[itype][1])
        elif vtype in VALUE_TYPES:
            self.need(struct.calcsize(VALUE_TYPES[vtype][1]), f"value of {key!r}")
            self.pos += struct.calcsize(VALUE_TYPES[vtype][1])
        else:
            raise self.fail(f"key {key!r} has unknown value type {vtype}")


def _tensor_nbytes(name: str, ggml_type: int, shape: tuple[int, ...], cur: _Cursor) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if shape[0] % block:
        raise cur.fail(f"tensor {name!r} ({kind.name}) has rows of {shape[0]} values, not a whole number of "
                       f"{kind.name} blocks of {block}")
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def _type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


def check_gguf_file(path: str | os.PathLike) -> GGUFLayout:
    """Check the structure of a .gguf file (header, key/values, tensor infos, tensor extents).

    Reads only the header; cost is proportional to the number of keys and array items, never to
    a declared count. Raises GGUFFormatError naming the file, the field and the offending value.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such GGUF file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFFormatError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(memoryview(buf), path)


def _walk(buf: memoryview, path: Path) -> GGUFLayout:
    cur = _Cursor(buf, path)
    try:
        return _walk_header(cur)
    finally:
        buf.release()


def _walk_header(cur: _Cursor) -> GGUFLayout:
    path = cur.path
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise GGUFFormatError(f"{path}: bad magic {magic!r} (expected {MAGIC!r}); not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0:
            raise GGUFFormatError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    tensor_count = cur.unpack("<Q", "tensor count")
    kv_count = cur.unpack("<Q", "key/value count")
    # smallest possible records: a key/value is 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8
    if kv_count * 13 + tensor_count * 32 > cur.size - cur.pos:
        raise GGUFFormatError(f"{path}: header declares {kv_count} key/values and {tensor_count} tensors, "
                              f"more than {cur.size} bytes can hold; the file is corrupt or truncated")

    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = cur.string(f"key {i}")
        if key in keys:
            raise cur.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = cur.unpack("<I", f"value type of {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                raise cur.fail(f"general.alignment has value type {VALUE_TYPES.get(vtype, (vtype,))[0]}, expected UINT32")
            alignment = cur.unpack("<I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment is {alignment}, not a power of two")
        else:
            cur.skip_value(vtype, key)

    infos = []
    names: set[str] = set()
    for i in range(tensor_count):
        name = cur.string(f"name of tensor {i}")
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.unpack("<Q", f"dimensions of tensor {name!r}") for _ in range(n_dims))
        if any(d == 0 or d >= 1 << 40 for d in shape):
            raise cur.fail(f"tensor {name!r} has the implausible shape {list(shape)}")
        ggml_type = cur.unpack("<I", f"type of tensor {name!r}")
        offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
        infos.append((name, ggml_type, shape, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    data_size = cur.size - data_offset
    extents = []
    for name, ggml_type, shape, offset in infos:
        nbytes = _tensor_nbytes(name, ggml_type, shape, cur)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            raise GGUFFormatError(f"{path}: tensor {name!r} ({_type_name(ggml_type)}, {nbytes} bytes at data offset "
                                  f"{offset}) extends past the end of the file ({max(data_size, 0)} data bytes); "
                                  f"the file is truncated")
        extents.append(TensorExtent(name, ggml_type, shape, data_offset + offset, nbytes))
    ordered = sorted(extents, key=lambda t: t.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.nbytes:
            raise GGUFFormatError(f"{path}: tensors {a.name!r} and {b.name!r} overlap")
    return GGUFLayout(version, kv_count, alignment, data_offset, tuple(extents))
