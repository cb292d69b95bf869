"""Reader of .sflash layout files: validate everything first, then hand out typed views.

`LayoutFile.open` checks the preamble, the header and index checksums, the whole index
(format_index.decode_index) and every permutation before returning; `verify=True` also checks
the crc32 of every resident tensor and FFN chunk. All reads use os.pread on one descriptor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import zstandard

from .format_index import decode_index, parse_json_object
from .format_spec import (
    CODEC_ZSTD,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    PREAMBLE_CRC_STRUCT,
    PREAMBLE_SIZE,
    PREAMBLE_STRUCT,
    VERSION,
    FfnLayer,
    LayoutChecksumError,
    LayoutError,
    LayoutTruncatedError,
    LayoutVersionError,
    Preamble,
    TensorEntry,
    crc32,
    record_digests,
)

_VERIFY_BLOCK = 16 * 1024 * 1024  # bytes per read while checksumming a large tensor


@dataclass(frozen=True)
class VerifyReport:
    """What `LayoutFile.verify` checked; `failures` lists every bad checksum, in file order."""

    tensors_checked: int
    chunks_checked: int
    bytes_checked: int  # raw (uncompressed) bytes whose crc32 was computed
    records_checked: int  # FFN records whose digest was computed
    failures: tuple[LayoutError, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


class LayoutFile:
    """An open, validated .sflash file. Use `LayoutFile.open(path)`; close it or use `with`."""

    def __init__(self, path: str, fd: int, preamble: Preamble, header: dict,
                 tensors: dict[str, TensorEntry], layers: tuple[FfnLayer, ...]):
        self.path, self._fd, self.preamble = path, fd, preamble
        self.header = header  # the writer caller's metadata, as parsed JSON
        self.tensors = tensors  # name -> TensorEntry, in file order
        self.layers = layers
        self._permutations: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> LayoutFile:
        """Open and validate `path`; with `verify`, also check every crc32 (reads the whole file).

        Raises LayoutError (or a subclass) for any malformed file; OSError if it cannot be opened.
        """
        path = os.fspath(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            layout = cls._validated(path, fd)
        except BaseException:
            os.close(fd)
            raise
        if verify:
            try:
                report = layout.verify()
            except BaseException:
                layout.close()
                raise
            if not report.ok:
                layout.close()
                raise report.failures[0]
        return layout

    @classmethod
    def _validated(cls, path: str, fd: int) -> LayoutFile:
        file_size = os.fstat(fd).st_size
        p = _read_preamble(path, fd, file_size)
        header = _read_json(path, fd, file_size, "header", p.header_offset, p.header_length, MAX_HEADER_BYTES,
                            p.header_crc32)
        index = _read_json(path, fd, file_size, "index", p.index_offset, p.index_length, MAX_INDEX_BYTES,
                           p.index_crc32)
        tensors, layers = decode_index(path, index, file_size, (p.header_offset, p.header_length),
                                       (p.index_offset, p.index_length))
        layout = cls(path, fd, p, header, tensors, layers)
        try:
            for layer in layers:
                layout._permutations[layer.index] = _checked_permutation(layout, layer)
        except BaseException:
            layout._fd = -1  # the caller closes fd; the object must not close it again
            raise
        return layout

    # ---- resident tensors -------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str, verify: bool = False) -> np.ndarray:
        """A fresh copy of tensor `name` (bf16 as uint16 bits; q8/q4 as uint8 rows, see
        TensorEntry.stored_shape); with `verify`, its crc32 is checked."""
        entry = self.tensors[name]
        buf = _pread(self.path, self._fd, entry.offset, entry.nbytes, f"tensor {name!r}")
        if verify and crc32(buf) != entry.crc32:
            raise _tensor_crc_error(self.path, entry, crc32(buf))
        return np.frombuffer(buf, dtype=entry.numpy_dtype).reshape(entry.stored_shape)

    def permutation(self, layer: int) -> np.ndarray:
        """Read-only int32 array (n_neurons,): stored position -> original neuron id."""
        return self._permutations[self.layers[layer].index]

    # ---- FFN bundles ------------------------------------------------------------------------

    def read_bundles(self, layer: int, positions=None, *, start: int | None = None,
                     count: int | None = None, verify: bool = False) -> np.ndarray:
        """Bundle rows (len(positions) or count, bundle_len) in the storage dtype (bf16 as uint16).

        Give stored `positions` (any order, repeats allowed) or a run `start`, `count`. Zstd layers
        and `verify=True` read whole chunks (checking their crc32 and every record's digest when
        verifying).
        """
        l = self.layers[layer]
        if positions is None:
            if start is None or count is None:
                raise TypeError("read_bundles needs positions or both start= and count=")
            _check_run(l, start, count)
            positions = np.arange(start, start + count, dtype=np.int64)
        else:
            positions = np.asarray(positions, dtype=np.int64).reshape(-1)
            if positions.size and (positions.min() < 0 or positions.max() >= l.n_neurons):
                raise IndexError(f"layer {layer}: positions must be in [0, {l.n_neurons})")
        out = np.empty((len(positions), l.bundle_len), dtype=l.numpy_dtype)  # (neurons, bundle_len)
        if not len(positions):
            return out
        if l.compressed or verify:
            chunk_ids = positions // l.chunk_neurons
            for k in np.unique(chunk_ids).tolist():
                rows = chunk_ids == k
                out[rows] = self.read_chunk(layer, k, verify)[positions[rows] - k * l.chunk_neurons]
            if verify:
                check_digests(self.path, l, positions, out)
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # runs of consecutive positions
        flat = out.reshape(-1).view(np.uint8)
        for lo, hi in pairwise([0, *breaks.tolist(), len(positions)]):
            offset = l.offset + int(positions[lo]) * l.bundle_bytes
            _pread_into(self.path, self._fd, offset, flat[lo * l.bundle_bytes: hi * l.bundle_bytes],
                        f"layer {layer} bundles")
        return out

    def read_chunk(self, layer: int, k: int, verify: bool = False) -> np.ndarray:
        """Chunk k of a layer, decompressed: (neurons_in_chunk, bundle_len) in the storage dtype."""
        l = self.layers[layer]
        chunk = l.chunk(k)
        field = f"index.layers[{l.index}].chunks[{k}]"
        raw = _pread(self.path, self._fd, chunk.offset, chunk.stored_length, field)
        if l.chunks.codec[k] == CODEC_ZSTD:
            raw = _unzstd(self.path, field, raw, chunk.raw_length)
        if verify and crc32(raw) != chunk.crc32:
            raise LayoutChecksumError(self.path, f"{field}.crc32", f"does not match the chunk bytes "
                                      f"(crc32 {crc32(raw):#010x})", f"{chunk.crc32:#010x}")
        return np.frombuffer(raw, dtype=l.numpy_dtype).reshape(chunk.n_neurons, l.bundle_len)

    # ---- whole-file checks and lifetime ----------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the crc32 of every resident tensor and every FFN chunk; reads the whole file."""
        failures: list[LayoutError] = []
        nbytes = 0
        for entry in self.tensors.values():
            value = 0
            for lo in range(0, entry.nbytes, _VERIFY_BLOCK):
                n = min(_VERIFY_BLOCK, entry.nbytes - lo)
                value = crc32(_pread(self.path, self._fd, entry.offset + lo, n, f"tensor {entry.name!r}"), value)
            nbytes += entry.nbytes
            if value != entry.crc32:
                failures.append(_tensor_crc_error(self.path, entry, value))
        n_chunks = n_records = 0
        for l in self.layers:
            for k in range(len(l.chunks)):
                try:
                    rows = self.read_chunk(l.index, k, verify=True)
                    first = k * l.chunk_neurons
                    check_digests(self.path, l, np.arange(first, first + len(rows)), rows)
                except LayoutChecksumError as e:  # includes zstd frames that do not decode
                    failures.append(e)
                n_chunks += 1
                n_records += int(l.chunks.raw_length[k]) // l.bundle_bytes
                nbytes += int(l.chunks.raw_length[k])
        return VerifyReport(len(self.tensors), n_chunks, nbytes, n_records, tuple(failures))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LayoutFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def check_digests(path: object, layer: FfnLayer, positions: np.ndarray, rows: np.ndarray,
                  index: np.ndarray | None = None) -> None:
    """Raise LayoutChecksumError naming the layer and stored position of the first record in
    ``rows`` (read for stored ``positions``; with ``index``, rows[index[i]] holds positions[i]) whose
    xxh3_64 digest is not the one in the index."""
    bad = np.flatnonzero(record_digests(rows, index) != layer.digests[np.asarray(positions)])
    if len(bad):
        p = int(np.asarray(positions)[bad[0]])
        raise LayoutChecksumError(path, f"index.layers[{layer.index}].digests[{p}]",
                                  f"the bytes of stored neuron {p} of layer {layer.index} are not the ones written "
                                  f"({len(bad)} of {len(rows)} records read differ)")


def _read_preamble(path: str, fd: int, file_size: int) -> Preamble:
    if file_size < PREAMBLE_SIZE:
        raise LayoutTruncatedError(path, "file size", f"shorter than the {PREAMBLE_SIZE}-byte preamble",
                                   file_size)
    raw = _pread(path, fd, 0, PREAMBLE_SIZE, "preamble")
    magic, version, flags, *fields, reserved = PREAMBLE_STRUCT.unpack_from(raw)
    if magic != MAGIC:
        raise LayoutError(path, "preamble.magic", f"not a sparseflash layout file (expected {MAGIC!r})", magic)
    if version != VERSION:
        advice = "upgrade sparseflash" if version > VERSION else "rebuild the layout with this sparseflash"
        raise LayoutVersionError(path, "preamble.version", f"this reader implements version {VERSION}; "
                                 f"{advice}", version)
    (stored_crc,) = PREAMBLE_CRC_STRUCT.unpack_from(raw, PREAMBLE_STRUCT.size)
    if crc32(raw[: PREAMBLE_STRUCT.size]) != stored_crc:
        raise LayoutChecksumError(path, "preamble.preamble_crc32", "does not match the preamble bytes",
                                  f"{stored_crc:#010x}")
    preamble = Preamble(version, flags, *fields)
    if flags != 0:
        raise LayoutError(path, "preamble.flags", "unknown flag bits (must be 0 in version 1)", flags)
    if reserved != bytes(len(reserved)):
        raise LayoutError(path, "preamble.reserved", "must be zero", reserved.hex())
    if preamble.file_size != file_size:
        error = LayoutTruncatedError if preamble.file_size > file_size else LayoutError
        raise error(path, "preamble.file_size", f"the file on disk has {file_size} bytes", preamble.file_size)
    return preamble


def _read_json(path: str, fd: int, file_size: int, name: str, offset: int, length: int, limit: int,
               expected_crc: int) -> dict:
    """The header or the index: bounds and size limit first, then crc32, then strict JSON."""
    if length > limit:
        raise LayoutError(path, f"preamble.{name}_length", f"exceeds the limit of {limit} bytes", length)
    if offset < PREAMBLE_SIZE or offset + length > file_size:
        raise LayoutError(path, f"preamble.{name}_offset", f"the {name} ({length} bytes) must lie "
                          f"within bytes [{PREAMBLE_SIZE}, {file_size}) of the file", offset)
    raw = _pread(path, fd, offset, length, name)
    if crc32(raw) != expected_crc:
        raise LayoutChecksumError(path, f"preamble.{name}_crc32", f"does not match the {name} bytes "
                                  f"(crc32 {crc32(raw):#010x})", f"{expected_crc:#010x}")
    return parse_json_object(path, name, bytes(raw))


def _checked_permutation(layout: LayoutFile, l: FfnLayer) -> np.ndarray:
    perm = layout.tensor(l.permutation)  # i32 of shape (n_neurons,), checked by decode_index
    if perm.min() < 0 or perm.max() >= l.n_neurons or np.bincount(perm, minlength=l.n_neurons).max() != 1:
        bad = perm[(perm < 0) | (perm >= l.n_neurons)]
        shown = int(bad[0]) if bad.size else "a repeated id"
        raise LayoutError(layout.path, f"tensor {l.permutation!r}",
                          f"not a permutation of range({l.n_neurons}) (layer {l.index})", shown)
    perm.flags.writeable = False
    return perm


def _check_run(l: FfnLayer, start: int, count: int) -> None:
    if not (0 <= start and 0 <= count and start + count <= l.n_neurons):
        raise IndexError(f"layer {l.index}: neurons [{start}, {start}+{count}) outside [0, {l.n_neurons})")


def _tensor_crc_error(path: str, entry: TensorEntry, actual: int) -> LayoutChecksumError:
    return LayoutChecksumError(path, f"tensor {entry.name!r}.crc32",
                               f"does not match the tensor bytes (crc32 {actual:#010x})", f"{entry.crc32:#010x}")


def _unzstd(path: str, field: str, stored: bytes, raw_length: int) -> bytes:
    """Decode one zstd frame that must declare and produce exactly raw_length bytes (no bombs)."""
    try:
        declared = zstandard.frame_content_size(stored)
        if declared != raw_length:  # checked before decoding, so a forged header cannot allocate
            raise LayoutChecksumError(path, f"{field}.codec", f"zstd frame declares {declared} bytes, "
                            f"index says raw_length {raw_length}", declared)
        decoder = zstandard.ZstdDecompressor().decompressobj()
        raw = decoder.decompress(stored)
    except zstandard.ZstdError as e:
        raise LayoutChecksumError(path, f"{field}.codec", "corrupt zstd frame", str(e)) from None
    if len(raw) != raw_length or not decoder.eof or decoder.unused_data:
        raise LayoutChecksumError(path, f"{field}.codec", "zstd frame does not decode to exactly raw_length bytes",
                        len(raw))
    return raw


def _pread(path: str, fd: int, offset: int, nbytes: int, what: str) -> bytearray:
    buf = bytearray(nbytes)
    _pread_into(path, fd, offset, memoryview(buf), what)
    return buf


def _pread_into(path: str, fd: int, offset: int, out, what: str) -> None:
    """Fill `out` (a writable buffer) from `offset`; a short read means the file shrank."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise LayoutTruncatedError(path, what, f"file ends at byte {offset + done}, "
                                       f"{len(view) - done} bytes short", offset + len(view))
        done += n
