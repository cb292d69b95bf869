"""The index of a .sflash file: JSON encoding and the structural validator.

`decode_index` checks everything that can be checked without reading tensor or bundle bytes:
types, enums, limits, dtype/shape/nbytes consistency, alignment, bounds against the real file
size, pairwise non-overlap of all sections, and that each chunk table tiles its region exactly.
Arithmetic is on Python ints (exact), and every size is compared to the file size before use,
so absurd values (2**63) are rejected without allocating anything.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np

from .format_spec import (
    ALIGNMENT,
    CODEC_NONE,
    CODECS,
    MAX_D_MODEL,
    MAX_I64,
    MAX_LAYERS,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NEURONS,
    MAX_TENSORS,
    PREAMBLE_SIZE,
    STORAGE_DTYPES,
    TENSOR_ALIGNMENT,
    TENSOR_TYPES,
    ChunkTable,
    FfnLayer,
    LayoutError,
    TensorEntry,
    align_up,
    itemsize,
    tensor_nbytes,
)

TENSOR_KEYS = ("name", "dtype", "shape", "offset", "nbytes", "crc32")
LAYER_KEYS = ("d_model", "n_neurons", "gated", "dtype", "bundle_bytes", "offset", "length", "n_hot",
              "threshold", "permutation", "chunk_neurons", "chunks", "digests")
MAX_U64 = (1 << 64) - 1
CHUNK_KEYS = ("offset", "stored_length", "raw_length", "crc32", "codec")


def encode_index(tensors: list[TensorEntry], layers: list[FfnLayer]) -> bytes:
    """The index as compact ASCII JSON with a fixed key order (the writer is deterministic)."""
    doc = {
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                     "nbytes": t.nbytes, "crc32": t.crc32} for t in tensors],
        "layers": [{
            "d_model": l.d_model, "n_neurons": l.n_neurons, "gated": l.gated, "dtype": l.dtype,
            "bundle_bytes": l.bundle_bytes, "offset": l.offset, "length": l.length, "n_hot": l.n_hot,
            "threshold": float(l.threshold), "permutation": l.permutation, "chunk_neurons": l.chunk_neurons,
            "chunks": {
                "offset": l.chunks.offset.tolist(), "stored_length": l.chunks.stored_length.tolist(),
                "raw_length": l.chunks.raw_length.tolist(), "crc32": l.chunks.crc32.tolist(),
                "codec": [CODECS[c] for c in l.chunks.codec.tolist()],
            },
            "digests": l.digests.tolist(),
        } for l in layers],
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii")


def parse_json_object(path: object, field: str, raw: bytes) -> dict:
    """Strict UTF-8 JSON that must be an object; NaN/Infinity and pathological nesting are rejected."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LayoutError(path, field, f"not valid UTF-8 JSON: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(value, dict):
        raise LayoutError(path, field, "must be a JSON object", type(value).__name__)
    return value


def _reject_constant(name: str):
    raise ValueError(f"non-standard constant {name}")


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all distinct (a repeated key would silently win in json.loads)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {repeated!r}")
    return out


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


class _Checker:
    """Typed field access with error messages naming the file and the JSON path of the field."""

    def __init__(self, path: object, file_size: int):
        self.path, self.file_size = path, file_size

    def fail(self, field: str, problem: str, value: object = ...):
        raise LayoutError(self.path, field, problem, value)

    def object(self, value, field: str, keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(field, "must be a JSON object", type(value).__name__)
        missing = [k for k in keys if k not in value]
        if missing:
            self.fail(field, "missing key", missing[0])
        unknown = sorted(set(value) - set(keys))
        if unknown:
            self.fail(field, "unknown key (a newer format version?)", unknown[0])
        return value

    def list(self, value, field: str, length: int | None = None, limit: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(field, "must be a JSON array", type(value).__name__)
        if length is not None and len(value) != length:
            self.fail(field, f"must have {length} entries", len(value))
        if limit is not None and len(value) > limit:
            self.fail(field, f"more than {limit} entries", len(value))
        return value

    def int(self, value, field: str, lo: int = 0, hi: int = MAX_I64) -> int:
        if type(value) is not int:  # bool is an int subclass; exclude it
            self.fail(field, "must be an integer", value)
        if not lo <= value <= hi:
            self.fail(field, f"must be in [{lo}, {hi}]", value)
        return value

    def offset(self, value, field: str, alignment: int) -> int:
        offset = self.int(value, field, 0, self.file_size)
        if offset % alignment:
            self.fail(field, f"must be a multiple of {alignment}", offset)
        return offset

    def enum(self, value, field: str, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            self.fail(field, f"must be one of {', '.join(allowed)}", value)
        return value

    def int_column(self, values: list, field: str, hi: int, dtype=np.int64) -> np.ndarray:
        for i, v in enumerate(values):
            if type(v) is not int or not 0 <= v <= hi:
                self.fail(f"{field}[{i}]", f"must be an integer in [0, {hi}]", v)
        column = np.array(values, dtype=dtype)
        column.flags.writeable = False
        return column


def decode_index(path: object, doc: dict, file_size: int, header_span: tuple[int, int],
                 index_span: tuple[int, int]) -> tuple[dict[str, TensorEntry], tuple[FfnLayer, ...]]:
    """Validate a parsed index against a file of `file_size` bytes; returns (tensors by name, layers).

    `header_span` and `index_span` are (offset, length) of the JSON header and the index, used
    for the overlap check. Raises LayoutError naming the first offending field.
    """
    c = _Checker(path, file_size)
    c.object(doc, "index", ("tensors", "layers"))
    tensors: dict[str, TensorEntry] = {}
    for i, entry in enumerate(c.list(doc["tensors"], "index.tensors", limit=MAX_TENSORS)):
        t = _decode_tensor(c, entry, f"index.tensors[{i}]")
        if t.name in tensors:
            c.fail(f"index.tensors[{i}].name", "duplicate tensor name", t.name)
        tensors[t.name] = t
    layers = tuple(_decode_layer(c, entry, f"index.layers[{i}]", i, tensors)
                   for i, entry in enumerate(c.list(doc["layers"], "index.layers", limit=MAX_LAYERS)))

    spans = [(0, PREAMBLE_SIZE, "preamble"), (*_end(header_span), "header"), (*_end(index_span), "index")]
    spans += [(t.offset, t.offset + t.nbytes, f"index.tensors[{i}] {t.name!r}")
              for i, t in enumerate(tensors.values()) if t.nbytes]
    spans += [(l.offset, align_up(l.offset + l.length, ALIGNMENT), f"index.layers[{l.index}] region")
              for l in layers]
    spans.sort(key=lambda span: (span[0], span[2] != "preamble"))  # name the index entry, not the preamble
    for (_, end_a, name_a), (start_b, _, name_b) in pairwise(spans):
        if start_b < end_a:
            c.fail(name_b, f"overlaps {name_a} (starts at byte {start_b}, before its end {end_a})", start_b)
    return tensors, layers


def _end(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[0] + span[1]


def _decode_tensor(c: _Checker, entry, field: str) -> TensorEntry:
    c.object(entry, field, TENSOR_KEYS)
    name = entry["name"]
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        c.fail(f"{field}.name", f"must be a non-empty string of at most {MAX_NAME_BYTES} bytes", name)
    dtype = c.enum(entry["dtype"], f"{field}.dtype", TENSOR_TYPES)
    shape = tuple(c.int(d, f"{field}.shape[{j}]")
                  for j, d in enumerate(c.list(entry["shape"], f"{field}.shape", limit=MAX_NDIM)))
    if math.prod(d for d in shape if d) * itemsize(dtype) > MAX_I64:  # numpy's limit, even when empty
        c.fail(f"{field}.shape", "too large for an array (product of non-zero dims * itemsize >= 2**63)",
               list(shape))
    offset = c.offset(entry["offset"], f"{field}.offset", TENSOR_ALIGNMENT)
    nbytes = c.int(entry["nbytes"], f"{field}.nbytes")
    expected = tensor_nbytes(dtype, shape)  # exact: Python ints do not overflow
    if expected is None:
        c.fail(f"{field}.shape", f"a {dtype} tensor's last dimension must be a multiple of its group size",
               list(shape))
    if nbytes != expected:
        c.fail(f"{field}.nbytes", f"must equal the bytes of its dtype and shape, {expected}", nbytes)
    if offset + nbytes > c.file_size:
        c.fail(f"{field}.nbytes", f"ends past the end of the file ({c.file_size} bytes)", nbytes)
    crc = c.int(entry["crc32"], f"{field}.crc32", 0, 0xFFFFFFFF)
    return TensorEntry(name, dtype, shape, offset, nbytes, crc)


def _decode_layer(c: _Checker, entry, field: str, index: int, tensors: dict[str, TensorEntry]) -> FfnLayer:
    c.object(entry, field, LAYER_KEYS)
    d_model = c.int(entry["d_model"], f"{field}.d_model", 1, MAX_D_MODEL)
    n = c.int(entry["n_neurons"], f"{field}.n_neurons", 1, MAX_NEURONS)
    gated = entry["gated"]
    if not isinstance(gated, bool):
        c.fail(f"{field}.gated", "must be true or false", gated)
    dtype = c.enum(entry["dtype"], f"{field}.dtype", STORAGE_DTYPES)
    bundle_bytes = c.int(entry["bundle_bytes"], f"{field}.bundle_bytes", 1, c.file_size)
    if bundle_bytes % itemsize(dtype):
        c.fail(f"{field}.bundle_bytes", f"must be a multiple of the {dtype} itemsize", bundle_bytes)
    offset = c.offset(entry["offset"], f"{field}.offset", ALIGNMENT)
    length = c.int(entry["length"], f"{field}.length", 1, c.file_size)
    if align_up(offset + length, ALIGNMENT) > c.file_size:
        c.fail(f"{field}.length", f"region padded to {ALIGNMENT} ends past the end of the file", length)
    n_hot = c.int(entry["n_hot"], f"{field}.n_hot", 0, n)
    threshold = entry["threshold"]
    if type(threshold) not in (int, float) or not math.isfinite(threshold):
        c.fail(f"{field}.threshold", "must be a finite number", threshold)
    perm = entry["permutation"]
    t = tensors.get(perm) if isinstance(perm, str) else None
    if t is None:
        c.fail(f"{field}.permutation", "must name a tensor in index.tensors", perm)
    if t.dtype != "i32" or t.shape != (n,):
        c.fail(f"{field}.permutation", f"tensor must be i32 of shape [{n}]", f"{t.dtype} {list(t.shape)}")
    chunk_neurons = c.int(entry["chunk_neurons"], f"{field}.chunk_neurons", 1, n)
    chunks = _decode_chunks(c, entry["chunks"], f"{field}.chunks", n, chunk_neurons, bundle_bytes,
                            offset, length)
    digests = c.int_column(c.list(entry["digests"], f"{field}.digests", length=n), f"{field}.digests", MAX_U64,
                           np.uint64)
    return FfnLayer(index, d_model, n, gated, dtype, bundle_bytes, offset, length, n_hot, float(threshold),
                    perm, chunk_neurons, chunks, digests)


def _decode_chunks(c: _Checker, entry, field: str, n: int, chunk_neurons: int, bundle_bytes: int,
                   region_offset: int, region_length: int) -> ChunkTable:
    """Chunk k holds neurons [k*chunk_neurons, ...); the chunks tile the region in order, no gaps."""
    c.object(entry, field, CHUNK_KEYS)
    n_chunks = -(-n // chunk_neurons)
    cols = {k: c.list(entry[k], f"{field}.{k}", length=n_chunks) for k in CHUNK_KEYS}
    offset = c.int_column(cols["offset"], f"{field}.offset", c.file_size)
    stored = c.int_column(cols["stored_length"], f"{field}.stored_length", c.file_size)
    raw = c.int_column(cols["raw_length"], f"{field}.raw_length", c.file_size)
    crc = c.int_column(cols["crc32"], f"{field}.crc32", 0xFFFFFFFF)
    codec = np.array([CODECS.index(c.enum(v, f"{field}.codec[{i}]", CODECS))
                      for i, v in enumerate(cols["codec"])], dtype=np.uint8)
    codec.flags.writeable = False

    rows = np.full(n_chunks, chunk_neurons, dtype=np.int64)
    rows[-1] = n - (n_chunks - 1) * chunk_neurons
    expected_start = np.concatenate(([region_offset], offset[:-1] + stored[:-1]))  # < 2**63: all <= file_size
    checks = [
        ("raw_length", raw, raw != rows * bundle_bytes, "must be neurons_in_chunk * bundle_bytes"),
        ("stored_length", stored, (codec == CODEC_NONE) & (stored != raw), "must equal raw_length for codec none"),
        ("stored_length", stored, stored == 0, "must be positive"),
        ("offset", offset, offset != expected_start, "must follow the previous chunk (or start the region)"),
    ]
    for name, column, bad, problem in checks:
        if bad.any():
            k = int(np.argmax(bad))
            c.fail(f"{field}.{name}[{k}]", problem, int(column[k]))
    end = int(offset[-1]) + int(stored[-1])
    if end != region_offset + region_length:
        c.fail(f"{field}.stored_length[{n_chunks - 1}]",
               f"chunks must end at the region end {region_offset + region_length}", end)
    return ChunkTable(offset, stored, raw, crc, codec)
