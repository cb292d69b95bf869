"""Writer of .sflash layout files, in three phases: declare, plan, write.

    writer = LayoutWriter("model.sflash", header={"config": {...}}, zstd_level=None)
    writer.add_tensor("embed", embed)                      # (1) declare
    writer.add_tensor("layers.0.perm", perm)
    writer.add_ffn_layer(d_model=..., n_neurons=..., gated=True, dtype="f16", bundle_bytes=...,
                         permutation="layers.0.perm", n_hot=512, bundles=iter_blocks())
    writer.plan()                                          # (2) check, place tensors (optional)
    writer.write(progress=lambda done, total: ...)         # (3) temp file -> fsync -> rename

Bundles are pulled from each layer's iterator one block at a time, cut into chunks and written,
so a layer is never held twice; every record's xxh3_64 digest goes to the index. The output is a
pure function of the inputs (no timestamps).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import zstandard

from .format_index import encode_index
from .format_spec import (
    ALIGNMENT,
    CODEC_NONE,
    CODEC_ZSTD,
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    MAX_D_MODEL,
    MAX_HEADER_BYTES,
    MAX_I64,
    MAX_INDEX_BYTES,
    MAX_LAYERS,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NEURONS,
    MAX_TENSORS,
    PREAMBLE_SIZE,
    STORAGE_DTYPES,
    TEMP_INFIX,
    TENSOR_ALIGNMENT,
    TENSOR_TYPES,
    VERSION,
    ChunkTable,
    FfnLayer,
    LayoutError,
    Preamble,
    TensorEntry,
    align_up,
    crc32,
    itemsize,
    numpy_dtype,
    record_digests,
    stored_shape,
    tensor_nbytes,
)

Progress = Callable[[int, int], None]  # (raw bytes done, raw bytes total)


def temp_path_for(path: str | os.PathLike) -> str:
    """The temp file the writer uses for `path`: '.<name>.tmp-<pid>' in the same directory."""
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}{TEMP_INFIX}{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for a leftover writer temp file name such as '.model.sflash.tmp-1234' (safe to delete
    once that pid no longer runs a writer)."""
    stem, sep, pid = name.rpartition(TEMP_INFIX)
    return name.startswith(".") and bool(sep) and len(stem) > 1 and pid.isdigit()


@dataclass
class _LayerDecl:
    d_model: int
    n_neurons: int
    gated: bool
    dtype: str
    bundle_bytes: int
    n_hot: int
    threshold: float
    permutation: str
    chunk_neurons: int
    bundles: Iterable[np.ndarray]


@dataclass(frozen=True)
class LayoutPlan:
    """Where the known-size parts go. FFN regions follow `ffn_offset` in declaration order; with
    zstd their lengths are only known once written, so their offsets are fixed during write."""

    tensor_offsets: dict[str, int]  # name -> byte offset
    ffn_offset: int  # byte offset of layer 0's region (multiple of ALIGNMENT)
    chunk_neurons: tuple[int, ...]  # per layer
    raw_bytes: int  # tensor bytes + raw bundle bytes: the progress total


class LayoutWriter:
    """Builds one .sflash file; see the module docstring for the phases."""

    def __init__(self, path: str | os.PathLike, header: Mapping, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 zstd_level: int | None = None):
        """`header`: JSON-serialisable metadata (stored with sorted keys). `chunk_bytes`: target raw
        bytes per chunk when a layer gives no chunk_neurons. `zstd_level`: None stores chunks raw."""
        self.path = os.fspath(path)
        if not isinstance(header, Mapping):
            self._fail("header", "must be a mapping (JSON object)", type(header).__name__)
        try:
            text = json.dumps(dict(header), sort_keys=True, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"))
            self._header = text.encode("utf-8")
        except (TypeError, ValueError) as e:
            self._fail("header", f"not JSON-serialisable: {e}")
        if len(self._header) > MAX_HEADER_BYTES:
            self._fail("header", f"exceeds {MAX_HEADER_BYTES} bytes", len(self._header))
        if type(chunk_bytes) is not int or chunk_bytes < 1:
            self._fail("chunk_bytes", "must be a positive integer", chunk_bytes)
        self.chunk_bytes, self.zstd_level = chunk_bytes, zstd_level
        self._tensors: dict[str, tuple[str, np.ndarray, tuple]] = {}  # name -> (dtype tag, array, shape)
        self._layers: list[_LayerDecl] = []
        self._written = False

    def _fail(self, field: str, problem: str, value: object = ...):
        raise LayoutError(self.path, field, problem, value)

    # ---- phase 1: declare -------------------------------------------------------------------

    def add_tensor(self, name: str, array: np.ndarray, dtype: str | None = None,
                   shape: tuple[int, ...] | None = None) -> None:
        """Declare a resident tensor. `dtype` defaults from array.dtype; bf16 must be tagged
        explicitly and passed as uint16 bits. A quantized tensor (q8, q4) is passed as its uint8
        rows with its logical `shape` (last dimension: values per row). The array is read at
        write time, not copied now."""
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            self._fail("tensor name", f"must be a non-empty string of at most {MAX_NAME_BYTES} bytes", name)
        if name in self._tensors:
            self._fail(f"tensor {name!r}", "declared twice")
        if len(self._tensors) >= MAX_TENSORS:
            self._fail(f"tensor {name!r}", f"more than {MAX_TENSORS} tensors")
        array = np.asarray(array)
        if dtype is None:
            little = array.dtype.newbyteorder("<")  # compare the type, whatever its byte order
            dtype = next((tag for tag, dt in DTYPES.items() if tag != "bf16" and dt == little), None)
            if dtype is None:
                self._fail(f"tensor {name!r}.dtype", f"numpy dtype has no tag in {sorted(DTYPES)}", str(array.dtype))
        self._check_dtype(f"tensor {name!r}", array, dtype, TENSOR_TYPES)
        shape = tuple(array.shape) if shape is None else tuple(int(d) for d in shape)
        if len(shape) > MAX_NDIM:
            self._fail(f"tensor {name!r}.shape", f"more than {MAX_NDIM} dimensions", shape)
        if tensor_nbytes(dtype, shape) is None or stored_shape(dtype, shape) != array.shape:
            self._fail(f"tensor {name!r}.shape", f"a {dtype} tensor of shape {list(shape)} is stored as "
                       f"{list(stored_shape(dtype, shape))}", list(array.shape))
        self._tensors[name] = (dtype, array, shape)

    def add_ffn_layer(self, *, d_model: int, n_neurons: int, gated: bool, dtype: str, bundle_bytes: int,
                      permutation: str, bundles: Iterable[np.ndarray] | np.ndarray, n_hot: int = 0,
                      threshold: float = 0.0, chunk_neurons: int | None = None) -> int:
        """Declare the next FFN layer; returns its index.

        Each neuron is one record of `bundle_bytes` bytes (a multiple of the dtype's itemsize; what
        the bytes mean is the caller's contract, layout/schema.py for model layouts). `bundles` yields
        2-D blocks (rows, bundle_bytes // itemsize) in the storage dtype (bf16 as uint16), in stored
        order, n_neurons rows in total; a single ndarray is one block. `permutation` names an i32
        tensor of shape (n_neurons,) declared with add_tensor. `chunk_neurons` defaults to
        chunk_bytes // bundle_bytes (at least 1).
        """
        field = f"layer {len(self._layers)}"
        if len(self._layers) >= MAX_LAYERS:
            self._fail(field, f"more than {MAX_LAYERS} layers")
        d_model = self._int(f"{field}.d_model", d_model, 1, MAX_D_MODEL)
        n_neurons = self._int(f"{field}.n_neurons", n_neurons, 1, MAX_NEURONS)
        if not isinstance(gated, bool):
            self._fail(f"{field}.gated", "must be a bool", gated)
        if dtype not in STORAGE_DTYPES:
            self._fail(f"{field}.dtype", f"must be one of {', '.join(STORAGE_DTYPES)}", dtype)
        bundle_bytes = self._int(f"{field}.bundle_bytes", bundle_bytes, 1, MAX_I64)
        if bundle_bytes % itemsize(dtype):
            self._fail(f"{field}.bundle_bytes", f"must be a multiple of the {dtype} itemsize", bundle_bytes)
        n_hot = self._int(f"{field}.n_hot", n_hot, 0, n_neurons)
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not math.isfinite(threshold):
            self._fail(f"{field}.threshold", "must be a finite number", threshold)
        if chunk_neurons is None:
            chunk_neurons = min(n_neurons, max(1, self.chunk_bytes // bundle_bytes))
        chunk_neurons = self._int(f"{field}.chunk_neurons", chunk_neurons, 1, n_neurons)
        if isinstance(bundles, np.ndarray):
            bundles = [bundles]
        self._layers.append(_LayerDecl(d_model, n_neurons, gated, dtype, bundle_bytes, n_hot, float(threshold), permutation,
                                       chunk_neurons, bundles))
        return len(self._layers) - 1

    def _int(self, field: str, value, lo: int, hi: int) -> int:
        """`value` as a Python int in [lo, hi]; numpy integers are accepted, bools and floats are not."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
            self._fail(field, f"must be an integer in [{lo}, {hi}]", value)
        return int(value)

    def _check_dtype(self, field: str, array: np.ndarray, dtype: str, allowed: tuple[str, ...]) -> None:
        if dtype not in allowed:
            self._fail(f"{field}.dtype", f"must be one of {', '.join(allowed)}", dtype)
        if array.dtype.newbyteorder("<") != numpy_dtype(dtype):
            self._fail(f"{field}.dtype", f"tag {dtype} needs numpy {numpy_dtype(dtype)} (bf16 as uint16 bits, "
                       "q8/q4 as uint8 bytes)",
                       str(array.dtype))

    # ---- phase 2: plan ----------------------------------------------------------------------

    def plan(self) -> LayoutPlan:
        """Check cross-references (permutation tensors) and place the resident tensors."""
        for i, l in enumerate(self._layers):
            entry = self._tensors.get(l.permutation)
            if entry is None:
                self._fail(f"layer {i}.permutation", "names no declared tensor", l.permutation)
            tag, perm, _ = entry
            if tag != "i32" or perm.shape != (l.n_neurons,):
                self._fail(f"layer {i}.permutation", f"tensor must be i32 of shape ({l.n_neurons},)",
                           f"{tag} {perm.shape}")
            perm = perm.astype(np.int64)
            if perm.min() < 0 or perm.max() >= l.n_neurons or np.bincount(perm, minlength=l.n_neurons).max() != 1:
                self._fail(f"layer {i}.permutation", f"not a permutation of range({l.n_neurons})", l.permutation)
        offset, offsets = PREAMBLE_SIZE, {}
        for name, (_, array, _) in self._tensors.items():
            offset = align_up(offset, TENSOR_ALIGNMENT)
            offsets[name] = offset
            offset += array.nbytes
        raw_bytes = sum(a.nbytes for _, a, _ in self._tensors.values())
        raw_bytes += sum(l.n_neurons * l.bundle_bytes for l in self._layers)
        return LayoutPlan(offsets, align_up(offset, ALIGNMENT), tuple(l.chunk_neurons for l in self._layers),
                          raw_bytes)

    # ---- phase 3: write ---------------------------------------------------------------------

    def write(self, progress: Progress | None = None) -> str:
        """Write the file atomically and return its path. `progress(done, total)` is called after
        each tensor and chunk with raw bytes (a tqdm bar: `bar.total = total; bar.update(done - bar.n)`).

        Data goes to temp_path_for(path) and is renamed into place after fsync; on any exception,
        KeyboardInterrupt included, the temp file is removed and `path` is left as it was.
        """
        if self._written:
            raise RuntimeError(f"{self.path}: LayoutWriter.write may run once (bundle iterators are consumed)")
        plan = self.plan()
        self._written = True
        if progress is not None:  # the total is known before the first byte: a bar shows it from the start
            progress(0, plan.raw_bytes)
        tmp = temp_path_for(self.path)
        try:
            with open(tmp, "wb") as f:
                self._write_body(_Sink(f, progress, plan.raw_bytes), plan)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def _write_body(self, out: _Sink, plan: LayoutPlan) -> None:
        out.write(bytes(PREAMBLE_SIZE))  # placeholder; the real preamble goes in last
        tensors = []
        for name, (tag, array, shape) in self._tensors.items():
            out.pad_to(plan.tensor_offsets[name])
            data = _little_endian_bytes(array, tag)
            tensors.append(TensorEntry(name, tag, shape, out.offset, data.nbytes, crc32(data)))
            out.write(data, raw=data.nbytes)
        layers = [self._write_layer(out, i, l) for i, l in enumerate(self._layers)]

        out.pad_to(align_up(out.offset, TENSOR_ALIGNMENT))
        header_offset = out.offset
        out.write(self._header)
        out.pad_to(align_up(out.offset, TENSOR_ALIGNMENT))
        index = encode_index(tensors, layers)
        if len(index) > MAX_INDEX_BYTES:
            self._fail("index", f"exceeds {MAX_INDEX_BYTES} bytes", len(index))
        index_offset = out.offset
        out.write(index)
        preamble = Preamble(VERSION, 0, out.offset, header_offset, len(self._header), index_offset, len(index),
                            crc32(self._header), crc32(index))
        out.file.seek(0)
        out.file.write(preamble.pack())

    def _write_layer(self, out: _Sink, index: int, l: _LayerDecl) -> FfnLayer:
        compressor = zstandard.ZstdCompressor(level=self.zstd_level) if self.zstd_level is not None else None
        bundle_bytes = l.bundle_bytes
        out.pad_to(align_up(out.offset, ALIGNMENT))
        region_offset = out.offset
        columns: list[list[int]] = [[], [], [], [], []]  # offset, stored, raw, crc, codec
        digests = []
        for raw in _chunks(self, index, l, bundle_bytes):
            digests.append(record_digests(np.frombuffer(raw, np.uint8).reshape(-1, bundle_bytes)))
            stored, codec = raw, CODEC_NONE
            if compressor is not None:
                packed = compressor.compress(raw)
                if len(packed) < len(raw):  # incompressible chunks stay raw
                    stored, codec = packed, CODEC_ZSTD
            for column, value in zip(columns, (out.offset, len(stored), len(raw), crc32(raw), codec), strict=True):
                column.append(value)
            out.write(stored, raw=len(raw))
        length = out.offset - region_offset
        out.pad_to(align_up(out.offset, ALIGNMENT))  # aligned reads of the last neuron stay in the file
        table = ChunkTable(*(np.array(c, dtype=np.int64) for c in columns[:4]), np.array(columns[4], np.uint8))
        return FfnLayer(index, l.d_model, l.n_neurons, l.gated, l.dtype, bundle_bytes, region_offset, length,
                        l.n_hot, l.threshold, l.permutation, l.chunk_neurons, table, np.concatenate(digests))


def _chunks(writer: LayoutWriter, index: int, l: _LayerDecl, bundle_bytes: int) -> Iterator[memoryview]:
    """Re-cut the caller's blocks into chunks of chunk_neurons rows (the last may be shorter)."""
    chunk_bytes = l.chunk_neurons * bundle_bytes
    total = l.n_neurons * bundle_bytes
    pending = bytearray()
    done = 0  # bytes received
    for block in l.bundles:
        field = f"layer {index}.bundles"
        block = np.asarray(block)
        writer._check_dtype(field, block, l.dtype, (l.dtype,))
        row = l.bundle_bytes // itemsize(l.dtype)
        if block.ndim != 2 or block.shape[1] != row:
            writer._fail(field, f"blocks must have shape (rows, {row})", block.shape)
        view = _little_endian_bytes(block, l.dtype)
        done += view.nbytes
        if done > total:
            writer._fail(field, f"more than n_neurons = {l.n_neurons} rows", done // bundle_bytes)
        pos = 0
        if pending:
            take = min(chunk_bytes - len(pending), view.nbytes)
            pending += view[:take]
            pos = take
            if len(pending) == chunk_bytes:
                yield memoryview(pending)
                pending = bytearray()
        while view.nbytes - pos >= chunk_bytes:  # whole chunks straight from the caller's block
            yield view[pos: pos + chunk_bytes]
            pos += chunk_bytes
        pending += view[pos:]
    if done != total:
        writer._fail(f"layer {index}.bundles", f"yielded {done // bundle_bytes} rows, need {l.n_neurons}",
                     done // bundle_bytes)
    if pending:
        yield memoryview(pending)


def _little_endian_bytes(array: np.ndarray, tag: str) -> memoryview:
    """Flat byte view of `array` in the file's byte order (copies only if it must)."""
    return memoryview(np.ascontiguousarray(array, dtype=numpy_dtype(tag)).reshape(-1).view(np.uint8))


class _Sink:
    """The output file plus the running byte offset and progress reporting."""

    def __init__(self, file, progress: Progress | None, total: int):
        self.file, self.progress, self.total = file, progress, total
        self.offset = 0
        self.done = 0

    def write(self, data, raw: int = 0) -> None:
        self.file.write(data)
        self.offset += memoryview(data).nbytes
        if raw:
            self.done += raw
            if self.progress is not None:
                self.progress(self.done, self.total)

    def pad_to(self, offset: int) -> None:
        self.write(bytes(offset - self.offset))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
