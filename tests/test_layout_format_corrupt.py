"""Corrupted .sflash files: every one must fail with a LayoutError naming the file and the field.
(Random damage, property-based: test_layout_format_fuzz.py; the sample files: tests/conftest.py.)

Structural corruptions are made by rewriting the index (or header, or preamble) with valid
checksums, so they reach the deep validators rather than stopping at a crc mismatch.
"""

import copy
import json
import tracemalloc
import zlib

import numpy as np
import pytest
from test_layout_format_samples import (
    header_bytes_of,
    index_of,
    open_bytes,
    preamble_of,
    reassemble,
    with_preamble_bytes,
)

from sparseflash.layout.format import (
    MAX_HEADER_BYTES,
    LayoutChecksumError,
    LayoutError,
    LayoutFile,
    LayoutTruncatedError,
    LayoutVersionError,
)


def _expect_error(workdir, blob: bytes, field: str, kind=LayoutError, verify: bool = False) -> LayoutError:
    with pytest.raises(kind) as caught:
        open_bytes(workdir, blob, verify)
    message = str(caught.value)
    assert field in message and str(workdir / "case.sflash") in message and "\n" not in message, message
    return caught.value


# ---- truncation and flipped bytes -----------------------------------------------------------------


def test_truncation_anywhere_is_detected(workdir, raw_blob):
    p = preamble_of(raw_blob)
    cuts = list(range(0, 160)) + list(range(p.header_offset - 1, len(raw_blob)))  # every metadata byte
    cuts += list(range(160, p.header_offset, 89))  # sampled through the data
    for cut in cuts:
        with pytest.raises(LayoutError):
            open_bytes(workdir, raw_blob[:cut])
    _expect_error(workdir, raw_blob[:1000], "preamble.file_size", LayoutTruncatedError)
    _expect_error(workdir, raw_blob[:100], "file size", LayoutTruncatedError)


def test_flipped_preamble_header_or_index_byte_is_always_detected(workdir, raw_blob):
    p = preamble_of(raw_blob)
    positions = list(range(128)) + list(range(p.header_offset, p.header_offset + p.header_length))
    positions += list(range(p.index_offset, p.index_offset + p.index_length))  # not the padding between
    for i in positions:
        for mask in (1 << (i % 8), 0xFF):
            blob = bytearray(raw_blob)
            blob[i] ^= mask
            with pytest.raises(LayoutError):
                open_bytes(workdir, bytes(blob))


@pytest.mark.parametrize("which", ["golden", "zstd"])
def test_flipped_data_byte_is_caught_by_verify_or_was_padding(workdir, which, golden_blob, zstd_blob):
    blob = golden_blob if which == "golden" else zstd_blob
    original = open_bytes(workdir, blob, verify=True)
    with LayoutFile.open(workdir / "case.sflash") as layout:
        raw = [(t.offset, t.nbytes) for t in layout.tensors.values()]
        chunks = [l.chunk(k) for l in layout.layers for k in range(len(l.chunks))]
    raw += [(c.offset, c.stored_length) for c in chunks if c.codec == "none"]
    packed = [(c.offset, c.stored_length) for c in chunks if c.codec == "zstd"]
    covered = np.zeros(len(blob), dtype=bool)  # bytes a crc32 must protect directly
    for offset, nbytes in raw:
        covered[offset: offset + nbytes] = True
    targets = set(np.flatnonzero(covered)[:: 1 if which == "golden" else 4].tolist())
    for offset, nbytes in packed:  # every frame-header byte, then a sample of the blocks
        targets |= set(range(offset, offset + 16)) | set(range(offset, offset + nbytes, 5))
    targets |= set(range(128, preamble_of(blob).header_offset, 97))  # padding, sampled
    for i in sorted(targets):
        flipped = bytearray(blob)
        flipped[i] ^= 0x10
        try:
            got = open_bytes(workdir, bytes(flipped), verify=True)
        except LayoutError:
            continue
        assert not covered[i], f"flip at byte {i} (raw data) went unnoticed"
        assert got == original  # padding, or a zstd frame bit the decoder ignores


def test_bad_data_passes_open_but_not_verify(workdir, raw_blob):
    p = index_of(raw_blob)["layers"][1]
    blob = bytearray(raw_blob)
    blob[p["offset"] + 5] ^= 1
    open_bytes(workdir, bytes(blob))  # structure is fine
    _expect_error(workdir, bytes(blob), "index.layers[1].chunks[0].crc32", LayoutChecksumError, verify=True)
    embed = index_of(raw_blob)["tensors"][0]
    blob = bytearray(raw_blob)
    blob[embed["offset"]] ^= 1
    _expect_error(workdir, bytes(blob), "tensor 'embed'.crc32", LayoutChecksumError, verify=True)


# ---- structural corruptions with valid checksums -----------------------------------------------------


def _set(path: str, value):
    """Mutation setting the index field at a dotted path ('layers.0.chunks.offset.1')."""
    def mutate(index):
        *parents, last = path.split(".")
        node = index
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value(node[int(last) if isinstance(node, list)
                                                                         else last]) if callable(value) else value
    return mutate


def _move_layer(l: int, delta: int):
    def mutate(index):
        layer = index["layers"][l]
        layer["offset"] += delta
        layer["chunks"]["offset"] = [o + delta for o in layer["chunks"]["offset"]]
    return mutate


def _delete(path: str):
    def mutate(index):
        *parents, last = path.split(".")
        node = index
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return mutate


STRUCTURAL = {  # id: (mutation of the index dict, text the error must contain)
    "tensor offset past the end": (_set("tensors.0.offset", 1 << 40), "index.tensors[0].offset"),
    "tensor offset misaligned": (_set("tensors.0.offset", 130), "index.tensors[0].offset"),
    "tensor nbytes 2**63": (_set("tensors.0.nbytes", 2**63), "index.tensors[0].nbytes"),
    "tensor nbytes 2**64": (_set("tensors.0.nbytes", 2**64), "index.tensors[0].nbytes"),
    "tensor shape absurd": (_set("tensors.0.shape", [2**62, 2**62]), "index.tensors[0].shape"),
    "tensor nbytes off by one": (_set("tensors.0.nbytes", 95), "index.tensors[0].nbytes"),
    "tensor consistent but huge": (lambda ix: ix["tensors"][3].update(shape=[2**40], nbytes=2**42),
                                   "index.tensors[3].nbytes"),
    "empty tensor with an absurd dim": (_set("tensors.8.shape", [0, 2**62, 4]), "index.tensors[8].shape"),
    "tensor negative dim": (_set("tensors.0.shape", [-1, 4]), "index.tensors[0].shape[0]"),
    "tensor shape not a list": (_set("tensors.0.shape", 24), "index.tensors[0].shape"),
    "tensor too many dims": (_set("tensors.0.shape", [1] * 9), "index.tensors[0].shape"),
    "tensor unknown dtype": (_set("tensors.0.dtype", "f8"), "index.tensors[0].dtype"),
    "tensor dtype not a string": (_set("tensors.0.dtype", 5), "index.tensors[0].dtype"),
    "tensor duplicate name": (_set("tensors.1.name", "embed"), "index.tensors[1].name"),
    "tensor empty name": (_set("tensors.1.name", ""), "index.tensors[1].name"),
    "tensor crc32 too big": (_set("tensors.0.crc32", 2**32), "index.tensors[0].crc32"),
    "tensor missing key": (_delete("tensors.0.crc32"), "missing key"),
    "tensor unknown key": (_set("tensors.0.extra", 1), "unknown key"),
    "tensor offset is a bool": (_set("tensors.5.offset", True), "index.tensors[5].offset"),
    "tensor overlaps tensor": (lambda ix: ix["tensors"][1].update(offset=ix["tensors"][0]["offset"]), "overlaps"),
    "tensor overlaps preamble": (_set("tensors.0.offset", 0), "index.tensors[0] 'embed': overlaps preamble"),
    "tensor overlaps region": (lambda ix: ix["tensors"][0].update(offset=ix["layers"][0]["offset"]), "overlaps"),
    "index unknown top key": (_set("version", 2), "unknown key"),
    "layers not a list": (_set("layers", {}), "index.layers"),
    "layer offset misaligned": (_move_layer(1, 64), "index.layers[1].offset"),
    "layer offset past the end": (_move_layer(1, 1 << 40), "index.layers[1].offset"),
    "layer length past the end": (_set("layers.3.length", 1 << 40), "index.layers[3].length"),
    "layer regions overlap": (_move_layer(1, -4096), "overlaps index.layers[0] region"),
    "layer gated not a bool": (_set("layers.0.gated", 1), "index.layers[0].gated"),
    "layer storage dtype i32": (_set("layers.0.dtype", "i32"), "index.layers[0].dtype"),
    "layer bundle_bytes disagrees with its chunks": (_set("layers.0.bundle_bytes", 64),
                                                     "index.layers[0].chunks.raw_length[0]"),
    "layer bundle_bytes not a multiple of the itemsize": (_set("layers.0.bundle_bytes", 97),
                                                          "index.layers[0].bundle_bytes"),
    "layer d_model 0": (_set("layers.0.d_model", 0), "index.layers[0].d_model"),
    "layer d_model absurd": (_set("layers.0.d_model", 2**62), "index.layers[0].d_model"),
    "layer n_neurons 2**63": (_set("layers.0.n_neurons", 2**63), "index.layers[0].n_neurons"),
    "layer n_hot > n_neurons": (_set("layers.0.n_hot", 38), "index.layers[0].n_hot"),
    "layer n_hot negative": (_set("layers.0.n_hot", -1), "index.layers[0].n_hot"),
    "layer threshold a string": (_set("layers.0.threshold", "0.5"), "index.layers[0].threshold"),
    "layer threshold a bool": (_set("layers.0.threshold", True), "index.layers[0].threshold"),
    "layer permutation missing": (_set("layers.0.permutation", "nope"), "index.layers[0].permutation"),
    "layer permutation wrong dtype": (_set("layers.0.permutation", "embed"), "index.layers[0].permutation"),
    "layer permutation wrong length": (_set("layers.0.permutation", "layers.1.ffn.permutation"),
                                       "index.layers[0].permutation"),
    "chunk_neurons 0": (_set("layers.0.chunk_neurons", 0), "index.layers[0].chunk_neurons"),
    "chunk_neurons changed": (_set("layers.0.chunk_neurons", 6), "index.layers[0].chunks.offset"),
    "chunk gap": (_set("layers.0.chunks.offset.1", lambda v: v + 1), "index.layers[0].chunks.offset[1]"),
    "chunk raw_length wrong": (_set("layers.0.chunks.raw_length.2", 7), "index.layers[0].chunks.raw_length[2]"),
    "chunk stored != raw for none": (_set("layers.0.chunks.stored_length.0", lambda v: v - 1),
                                     "index.layers[0].chunks.stored_length[0]"),
    "chunk unknown codec": (_set("layers.0.chunks.codec.0", "lz4"), "index.layers[0].chunks.codec[0]"),
    "chunk column too short": (lambda ix: ix["layers"][0]["chunks"]["crc32"].pop(), "index.layers[0].chunks.crc32"),
    "chunk offset a float": (_set("layers.0.chunks.offset.0", 4096.0), "index.layers[0].chunks.offset[0]"),
    "chunk offset 2**63": (_set("layers.0.chunks.offset.3", 2**63), "index.layers[0].chunks.offset[3]"),
    "chunks end before region end": (_set("layers.2.length", lambda v: v + 1), "index.layers[2].chunks"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_corruption_names_the_field(workdir, raw_blob, case):
    mutate, field = STRUCTURAL[case]
    index = copy.deepcopy(index_of(raw_blob))
    mutate(index)
    tracemalloc.start()
    try:
        _expect_error(workdir, reassemble(raw_blob, index=index), field)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"validating allocated {peak} bytes"


def _raw_index_edit(old: bytes, new: bytes):
    return lambda blob: reassemble(blob, index=index_bytes(blob).replace(old, new, 1))


def index_bytes(blob: bytes) -> bytes:
    p = preamble_of(blob)
    return blob[p.index_offset: p.index_offset + p.index_length]


PREAMBLE_AND_JSON = {  # id: (blob -> corrupted blob, text the error must contain, error type)
    "wrong magic": (lambda b: with_preamble_bytes(b, 0, b"GGUF\x00\x00\x00\x03"), "preamble.magic", LayoutError),
    "wrong version": (lambda b: reassemble(b, version=3), "preamble.version", LayoutVersionError),
    "version 1 (before record digests)": (lambda b: reassemble(b, version=1), "preamble.version", LayoutVersionError),
    "wrong version, bad crc": (lambda b: b[:8] + b"\x03" + b[9:], "preamble.version", LayoutVersionError),
    "flags set": (lambda b: reassemble(b, flags=1), "preamble.flags", LayoutError),
    "reserved set": (lambda b: with_preamble_bytes(b, 100, b"\x01"), "preamble.reserved", LayoutError),
    "header too long": (lambda b: reassemble(b, header_length=MAX_HEADER_BYTES + 1), "preamble.header_length",
                        LayoutError),
    "index length 2**63": (lambda b: reassemble(b, index_length=2**63), "preamble.index_length", LayoutError),
    "header offset 2**63": (lambda b: reassemble(b, header_offset=2**63), "preamble.header_offset", LayoutError),
    "index inside preamble": (lambda b: reassemble(b, index_offset=0), "preamble.index_offset", LayoutError),
    "file_size too big": (lambda b: reassemble(b, file_size=len(b) + 1), "preamble.file_size",
                          LayoutTruncatedError),
    "file_size too small": (lambda b: reassemble(b, file_size=len(b) - 1), "preamble.file_size", LayoutError),
    "header crc wrong": (lambda b: reassemble(b, header_crc32=1), "preamble.header_crc32", LayoutChecksumError),
    "index crc wrong": (lambda b: reassemble(b, index_crc32=1), "preamble.index_crc32", LayoutChecksumError),
    "header overlaps index": (lambda b: _header_is_index(b), "overlaps", LayoutError),
    "header not an object": (lambda b: reassemble(b, header=b"[1, 2]"), "header: must be a JSON object",
                             LayoutError),
    "header not JSON": (lambda b: reassemble(b, header=b"{'a': 1}"), "header: not valid", LayoutError),
    "header not UTF-8": (lambda b: reassemble(b, header=b'{"a": "\xff"}'), "header: not valid", LayoutError),
    "header NaN": (lambda b: reassemble(b, header=b'{"a": NaN}'), "header: not valid", LayoutError),
    "index deeply nested": (lambda b: reassemble(b, index=b"[" * 200000), "index: not valid", LayoutError),
    "index integer with 5000 digits": (_raw_index_edit(b'"offset":128', b'"offset":1' + b"0" * 5000),
                                       "index: not valid", LayoutError),
    "index threshold NaN": (_raw_index_edit(b'"threshold":0.0', b'"threshold":NaN'), "index: not valid",
                            LayoutError),
    "index empty": (lambda b: reassemble(b, index=b""), "index: not valid", LayoutError),
}


def _header_is_index(blob: bytes) -> bytes:
    """Point the header at the index bytes: both parse and their crcs match, but the spans coincide."""
    p = preamble_of(blob)
    return reassemble(blob, header_offset=p.index_offset, header_length=p.index_length, header_crc32=p.index_crc32)


@pytest.mark.parametrize("case", sorted(PREAMBLE_AND_JSON))
def test_preamble_and_json_corruption_names_the_field(workdir, raw_blob, case):
    corrupt, field, kind = PREAMBLE_AND_JSON[case]
    _expect_error(workdir, corrupt(raw_blob), field, kind)


def _patched_permutation(blob: bytes, layer: int, perm: np.ndarray) -> bytes:
    """Overwrite a permutation tensor's bytes and fix its crc, so only the permutation check can object."""
    index = copy.deepcopy(index_of(blob))
    name = index["layers"][layer]["permutation"]
    entry = next(t for t in index["tensors"] if t["name"] == name)
    data = perm.astype("<i4").tobytes()
    body = bytearray(blob)
    body[entry["offset"]: entry["offset"] + len(data)] = data
    entry["crc32"] = zlib.crc32(data)
    return reassemble(bytes(body), index=index)


@pytest.mark.parametrize("bad", ["repeat", "too big", "negative"])
def test_bad_permutation_is_rejected(workdir, raw_blob, bad):
    perm = np.arange(37)
    perm[5] = {"repeat": 4, "too big": 37, "negative": -1}[bad]
    err = _expect_error(workdir, _patched_permutation(raw_blob, 0, perm), "tensor 'layers.0.ffn.permutation'")
    assert "permutation of range(37)" in str(err)
    assert open_bytes(workdir, _patched_permutation(raw_blob, 0, np.arange(37)[::-1]))  # any permutation is fine


def test_zstd_frame_declaring_a_huge_size_is_rejected_without_allocating(workdir, zstd_blob):
    index = index_of(zstd_blob)
    l, k = next((l, k) for l, layer in enumerate(index["layers"])
                for k, codec in enumerate(layer["chunks"]["codec"]) if codec == "zstd")
    offset = index["layers"][l]["chunks"]["offset"][k]
    forged = b"\x28\xb5\x2f\xfd" + b"\xe0" + (2**40).to_bytes(8, "little")  # single segment, 8-byte size
    blob = bytearray(zstd_blob)
    blob[offset: offset + len(forged)] = forged
    tracemalloc.start()
    try:
        err = _expect_error(workdir, bytes(blob), f"index.layers[{l}].chunks[{k}]", LayoutChecksumError,
                            verify=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "declares 1099511627776 bytes" in str(err) and peak < 16 * 2**20


def test_header_bytes_are_the_sorted_compact_json(raw_blob):
    header = header_bytes_of(raw_blob)
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False).encode()
