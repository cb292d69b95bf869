"""Small .sflash files and byte-surgery helpers shared by the layout format tests (no tests here).

`build_sample` writes a file covering every dtype, gated and plain layers, all storage dtypes,
partial last chunks and n_hot > 0; `build_golden` writes the pinned minimal file. `reassemble`
rewrites the header, index or preamble of a file with valid checksums, so tests reach the deep
validators instead of stopping at a crc mismatch.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

from sparseflash.layout.format import PREAMBLE_SIZE, TENSOR_ALIGNMENT, LayoutFile, LayoutWriter, Preamble
from sparseflash.layout.format_spec import PREAMBLE_STRUCT


@dataclass
class Sample:
    """A written file and what was put in it."""

    path: str
    header: dict
    tensors: dict[str, tuple]  # name -> (dtype tag, array[, logical shape of a quantized tensor])
    bundles: list[np.ndarray]  # per layer: (n_neurons, bundle_len) in stored order
    permutations: list[np.ndarray]
    layers: list[dict]  # the add_ffn_layer keyword arguments, minus bundles


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def sample_inputs(seed: int = 0) -> tuple[dict, dict, list[dict], list[np.ndarray]]:
    """Header, tensors, layer declarations and bundle arrays of the standard sample."""
    rng = np.random.default_rng(seed)
    tensors = {
        "embed": ("f32", rng.standard_normal((6, 4)).astype(np.float32)),
        "norm": ("f16", rng.standard_normal(7).astype(np.float16)),
        "head": ("bf16", _bf16_bits(rng.standard_normal((2, 3)))),
        "ids": ("i32", rng.integers(-5, 5, 5).astype(np.int32)),
        "big_ids": ("i64", rng.integers(-2**40, 2**40, (2, 2)).astype(np.int64)),
        "mask": ("u8", rng.integers(0, 255, 9).astype(np.uint8)),
        "codes": ("u16", rng.integers(0, 65535, 4).astype(np.uint16)),
        "scale": ("f32", np.array(0.5, dtype=np.float32)),  # 0-d
        "empty": ("f32", np.zeros((0, 3), dtype=np.float32)),  # no bytes at all
        "digests": ("u32", rng.integers(0, 2**32, 3, dtype=np.uint64).astype(np.uint32)),
        # quantized: logical shape (3, 64) in groups of 32 -> rows of 2 groups x 34 (q8) / 18 (q4) bytes
        "wq8": ("q8", rng.integers(0, 256, (3, 68), dtype=np.uint8), (3, 64)),
        "wq4": ("q4", rng.integers(0, 256, (2, 2, 18), dtype=np.uint8), (2, 2, 32)),
    }
    specs = [  # (d_model, n_neurons, gated, dtype, chunk_neurons, n_hot)
        (8, 37, True, "f32", 5, 4),
        (16, 50, False, "f16", 8, 10),
        (4, 33, True, "bf16", 33, 33),
        (1, 1, False, "bf16", 1, 0),
        (32, 9, False, "q4", 4, 2),  # records of 2 parts x 18 bytes
        (32, 5, True, "q8", 2, 0),  # records of 3 parts x 34 bytes
    ]
    layers, bundles = [], []
    for i, (d, n, gated, dtype, chunk_neurons, n_hot) in enumerate(specs):
        parts = 3 if gated else 2
        rows = rng.standard_normal((n, parts * d))
        rows[: n // 3] = 0.0  # a compressible stretch, so zstd files mix codecs
        if dtype in ("q8", "q4"):  # records are opaque bytes to the container
            block = rng.integers(0, 256, (n, parts * d // 32 * (34 if dtype == "q8" else 18)), dtype=np.uint8)
            block[: n // 3] = 0
        elif dtype == "bf16":
            block = _bf16_bits(rows)
        else:
            block = rows.astype({"f32": np.float32, "f16": np.float16}[dtype])
        perm = rng.permutation(n).astype(np.int32)
        tensors[f"layers.{i}.ffn.permutation"] = ("i32", perm)
        layers.append(dict(d_model=d, n_neurons=n, gated=gated, dtype=dtype, bundle_bytes=block[0].nbytes,
                           chunk_neurons=chunk_neurons,
                           n_hot=n_hot, threshold=0.125 * i, permutation=f"layers.{i}.ffn.permutation"))
        bundles.append(block)
    header = {"model": {"d_model": 8, "n_layers": len(specs)}, "tokenizer": '{"vocab": {"é": 0}}',
              "source_sha256": "ab" * 32}
    return header, tensors, layers, bundles


def build_sample(path, zstd_level: int | None = None, seed: int = 0, block_rows: int = 7) -> Sample:
    """Write the standard sample to `path`, feeding bundles in blocks of `block_rows` rows."""
    header, tensors, layers, bundles = sample_inputs(seed)
    writer = LayoutWriter(path, header, zstd_level=zstd_level)
    for name, (tag, array, *shape) in tensors.items():
        writer.add_tensor(name, array, tag, *shape)
    for spec, block in zip(layers, bundles, strict=True):
        blocks = [block[i: i + block_rows] for i in range(0, len(block), block_rows)]
        writer.add_ffn_layer(bundles=iter(blocks), **spec)
    writer.write()
    perms = [tensors[spec["permutation"]][1] for spec in layers]
    return Sample(str(path), header, tensors, bundles, perms, layers)


def build_golden(path) -> None:
    """The pinned minimal file: one 3-neuron gated f16 layer (d_model 2, 2 chunks), its permutation."""
    writer = LayoutWriter(path, {"model": "golden-minimal", "d_model": 2})
    writer.add_tensor("layers.0.ffn.permutation", np.array([2, 0, 1], dtype=np.int32))
    bundles = (np.arange(18, dtype=np.float16) / 4).reshape(3, 6)  # (neurons, 3 * d_model)
    writer.add_ffn_layer(d_model=2, n_neurons=3, gated=True, dtype="f16", bundle_bytes=12,
                         permutation="layers.0.ffn.permutation",
                         bundles=bundles, n_hot=1, threshold=0.25, chunk_neurons=2)
    writer.write()


def content(layout: LayoutFile) -> tuple[dict, dict, list]:
    """Everything a reader can get out of a file, as bytes: header, tensors, bundles per layer."""
    tensors = {name: layout.tensor(name).tobytes() for name in layout.tensor_names}
    bundles = [layout.read_bundles(l.index, start=0, count=l.n_neurons).tobytes() for l in layout.layers]
    return layout.header, tensors, bundles


# ---- byte surgery -------------------------------------------------------------------------------


def preamble_of(blob: bytes) -> Preamble:
    _magic, *fields, _reserved = PREAMBLE_STRUCT.unpack_from(blob)
    return Preamble(*fields)


def index_of(blob: bytes) -> dict:
    p = preamble_of(blob)
    return json.loads(blob[p.index_offset: p.index_offset + p.index_length])


def header_bytes_of(blob: bytes) -> bytes:
    p = preamble_of(blob)
    return blob[p.header_offset: p.header_offset + p.header_length]


def reassemble(blob: bytes, *, header: bytes | None = None, index: dict | bytes | None = None,
               **preamble_fields) -> bytes:
    """Rebuild `blob` with a new header and/or index (valid crcs, lengths and file_size);
    `preamble_fields` then override any Preamble field (its own crc is always recomputed)."""
    p = preamble_of(blob)
    header = header_bytes_of(blob) if header is None else header
    if index is None:
        index = blob[p.index_offset: p.index_offset + p.index_length]
    elif isinstance(index, dict):
        index = json.dumps(index, separators=(",", ":")).encode()
    body = bytearray(blob[: p.header_offset]) + header
    body += bytes(-len(body) % TENSOR_ALIGNMENT)
    index_offset = len(body)
    body += index
    new = p._replace(file_size=len(body), header_length=len(header), index_offset=index_offset,
                     index_length=len(index), header_crc32=zlib.crc32(header), index_crc32=zlib.crc32(index))
    new = new._replace(**preamble_fields)
    body[:PREAMBLE_SIZE] = new.pack()
    return bytes(body)


def with_preamble_bytes(blob: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite preamble bytes at `offset` and recompute the preamble crc (e.g. the magic)."""
    body = bytearray(blob)
    body[offset: offset + len(value)] = value
    body[124:128] = zlib.crc32(bytes(body[:124])).to_bytes(4, "little")
    return bytes(body)


def open_bytes(workdir, blob: bytes, verify: bool = False, name: str = "case.sflash"):
    """Write `blob` as a file in `workdir` and read everything out of it (see `content`)."""
    path = workdir / name
    path.unlink(missing_ok=True)  # rewriting in place makes ext4 flush (auto_da_alloc): 40x slower
    path.write_bytes(blob)
    with LayoutFile.open(path, verify=verify) as layout:
        return content(layout)
