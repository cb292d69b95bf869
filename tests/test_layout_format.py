"""Round trips through the .sflash format, the runtime's extent API, and the pinned golden bytes.

Regenerate the golden file after a deliberate format change (and update GOLDEN_SHA256, the
VERSION if readers must notice, and the worked example in docs/layout-format.md):

    python tests/test_layout_format.py --regenerate-golden
"""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from test_layout_format_samples import build_golden, build_sample

from sparseflash.layout.format import ALIGNMENT, TENSOR_ALIGNMENT, LayoutFile
from sparseflash.layout.format_extents import BLOCK, plan_extents

GOLDEN = Path(__file__).parent / "data" / "golden_minimal.sflash.bin"  # *.sflash is git-ignored
GOLDEN_SIZE = 8777
GOLDEN_SHA256 = "6f46518c2dbb501b8ddfe64ce78a679c491c5675415d48a609f8be530489b282"


@pytest.fixture(scope="module", params=[None, 3], ids=["raw", "zstd"])
def sample(request, tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("layout") / "sample.sflash", zstd_level=request.param)


def test_header_tensors_and_permutations_round_trip(sample):
    with LayoutFile.open(sample.path, verify=True) as layout:
        assert layout.header == sample.header
        assert layout.tensor_names == list(sample.tensors)
        for name, (tag, array, *shape) in sample.tensors.items():
            got = layout.tensor(name, verify=True)
            assert layout.tensors[name].dtype == tag
            assert layout.tensors[name].shape == (tuple(shape[0]) if shape else array.shape)  # logical shape
            assert got.shape == array.shape and got.dtype == array.dtype
            assert got.tobytes() == array.tobytes()
            assert layout.tensors[name].offset % TENSOR_ALIGNMENT == 0
        for l, perm in enumerate(sample.permutations):
            assert np.array_equal(layout.permutation(l), perm)
            assert not layout.permutation(l).flags.writeable


def test_layer_records_match_declarations(sample):
    with LayoutFile.open(sample.path) as layout:
        assert len(layout.layers) == len(sample.layers)
        for l, spec in zip(layout.layers, sample.layers, strict=True):
            for key, value in spec.items():
                assert getattr(l, key) == value, key
            assert l.bundle_len * {"f32": 4, "f16": 2, "bf16": 2, "q8": 1, "q4": 1}[l.dtype] == l.bundle_bytes
            assert l.offset % ALIGNMENT == 0
            assert len(l.chunks) == -(-l.n_neurons // l.chunk_neurons)
            assert int(l.chunks.raw_length.sum()) == l.n_neurons * l.bundle_bytes


@pytest.mark.parametrize("verify", [False, True])
def test_every_run_of_neurons_reads_back_exactly(sample, verify):
    with LayoutFile.open(sample.path) as layout:
        for l, bundles in zip(layout.layers, sample.bundles, strict=True):
            n = l.n_neurons
            for start in range(n):
                for count in {0, 1, 2, 7, n - start}:
                    if start + count <= n:
                        got = layout.read_bundles(l.index, start=start, count=count, verify=verify)
                        assert got.dtype == bundles.dtype
                        assert got.tobytes() == bundles[start: start + count].tobytes()


def test_scattered_positions_read_back_in_the_order_asked(sample):
    rng = np.random.default_rng(1)
    with LayoutFile.open(sample.path) as layout:
        for l, bundles in zip(layout.layers, sample.bundles, strict=True):
            positions = rng.integers(0, l.n_neurons, 40)  # repeats and descending runs included
            positions[5:9] = [3 % l.n_neurons] * 4
            got = layout.read_bundles(l.index, positions)
            assert got.shape == (40, l.bundle_len)
            assert got.tobytes() == bundles[positions].tobytes()
            chunk = layout.read_chunk(l.index, len(l.chunks) - 1, verify=True)
            assert chunk.tobytes() == bundles[(len(l.chunks) - 1) * l.chunk_neurons:].tobytes()


def test_extents_are_aligned_reads_that_cover_exactly_the_neurons(sample):
    with LayoutFile.open(sample.path) as layout, open(sample.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        blob = f.read()
        for l, bundles in zip(layout.layers, sample.bundles, strict=True):
            if l.compressed:
                continue
            for start in range(l.n_neurons):
                for count in range(1, l.n_neurons - start + 1):
                    positions = np.arange(start, start + count)
                    ((first, end),) = plan_extents(positions, l.bundle_bytes)  # one run: one read
                    lo, hi = l.offset + first * BLOCK, l.offset + end * BLOCK
                    assert lo % ALIGNMENT == 0 and hi % ALIGNMENT == 0 and l.offset <= lo and hi <= size
                    skip = l.offset + start * l.bundle_bytes - lo
                    assert 0 <= skip < BLOCK and skip + count * l.bundle_bytes <= hi - lo
                    assert blob[lo + skip: lo + skip + count * l.bundle_bytes] == bundles[start: start + count].tobytes()
                    assert hi - lo < count * l.bundle_bytes + 2 * BLOCK  # no more than the covering blocks


def test_compressed_file_uses_zstd_where_it_helps_and_is_smaller(tmp_path):
    raw = build_sample(tmp_path / "raw.sflash")
    packed = build_sample(tmp_path / "packed.sflash", zstd_level=3)
    with LayoutFile.open(raw.path) as a, LayoutFile.open(packed.path) as b:
        assert not any(l.compressed for l in a.layers)
        assert any(l.compressed for l in b.layers)
        codecs = np.concatenate([l.chunks.codec for l in b.layers])
        assert set(codecs.tolist()) == {0, 1}  # random rows stay raw: incompressible
    assert os.path.getsize(packed.path) <= os.path.getsize(raw.path)


def test_misuse_raises_plain_errors_not_layout_errors(sample):
    with LayoutFile.open(sample.path) as layout:
        with pytest.raises(IndexError):
            layout.read_bundles(0, start=30, count=8)
        with pytest.raises(IndexError):
            layout.read_bundles(0, [0, 37])
        with pytest.raises(TypeError):
            layout.read_bundles(0)
        with pytest.raises(KeyError):
            layout.tensor("no such tensor")
        with pytest.raises(IndexError):
            layout.layers[0].chunk(99)


def test_verify_report_counts_everything(sample):
    with LayoutFile.open(sample.path) as layout:
        report = layout.verify()
    assert report.ok and report.tensors_checked == len(sample.tensors)
    assert report.chunks_checked == sum(-(-s["n_neurons"] // s["chunk_neurons"]) for s in sample.layers)
    assert report.bytes_checked == (sum(t[1].nbytes for t in sample.tensors.values())
                                    + sum(b.nbytes for b in sample.bundles))
    assert report.records_checked == sum(s["n_neurons"] for s in sample.layers)


def test_every_record_has_its_digest_and_a_changed_record_is_named(sample, tmp_path):
    """A record rewritten with a matching chunk crc32 (a writer bug, or an edit that fixed the crc)
    is still caught by its digest, which names the layer and the stored neuron."""
    import json
    import zlib

    from test_layout_format_samples import index_of, reassemble

    from sparseflash.layout.format import LayoutChecksumError, record_digests

    with LayoutFile.open(sample.path) as layout:
        for l, bundles in zip(layout.layers, sample.bundles, strict=True):
            assert np.array_equal(l.digests, record_digests(bundles))
        if any(x.compressed for x in layout.layers):
            return  # the zstd sample; the raw one edits a record below
        l = layout.layers[1]
    blob = bytearray(open(sample.path, "rb").read())
    target = l.offset + 3 * l.bundle_bytes + 1  # stored neuron 3
    blob[target] ^= 0x40
    index = index_of(bytes(blob))
    k = 3 // l.chunk_neurons
    start = l.offset + k * l.chunk_neurons * l.bundle_bytes
    index["layers"][l.index]["chunks"]["crc32"][k] = zlib.crc32(blob[start: start + l.chunks.raw_length[k]])
    bad = tmp_path / "bad.sflash"
    bad.write_bytes(reassemble(bytes(blob), index=json.dumps(index).encode()))
    with LayoutFile.open(bad) as layout:
        with pytest.raises(LayoutChecksumError, match=rf"layers\[{l.index}\].digests\[3\].*stored neuron 3 of layer"):
            layout.read_bundles(l.index, [0, 3], verify=True)
        assert layout.read_bundles(l.index, [0, 1], verify=True) is not None  # others are fine
        report = layout.verify()
        assert not report.ok and "digests[3]" in str(report.failures[0])


def test_writer_is_deterministic(tmp_path):
    for level in (None, 3):
        a = build_sample(tmp_path / f"a{level}.sflash", zstd_level=level, block_rows=7)
        b = build_sample(tmp_path / f"b{level}.sflash", zstd_level=level, block_rows=50)
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


def test_golden_file_bytes_are_pinned(tmp_path):
    build_golden(tmp_path / "golden.sflash")
    blob = (tmp_path / "golden.sflash").read_bytes()
    assert (len(blob), hashlib.sha256(blob).hexdigest()) == (GOLDEN_SIZE, GOLDEN_SHA256), \
        "format bytes changed: if deliberate, see this file's docstring"
    assert blob == GOLDEN.read_bytes()


def test_golden_file_reads_as_documented():
    with LayoutFile.open(GOLDEN, verify=True) as layout:
        assert layout.header == {"d_model": 2, "model": "golden-minimal"}
        assert layout.tensor_names == ["layers.0.ffn.permutation"]
        assert layout.permutation(0).tolist() == [2, 0, 1]
        (l,) = layout.layers
        assert (l.d_model, l.n_neurons, l.gated, l.dtype, l.bundle_bytes) == (2, 3, True, "f16", 12)
        assert (l.offset, l.length, l.n_hot, l.threshold, l.chunk_neurons) == (4096, 36, 1, 0.25, 2)
        assert l.chunks.offset.tolist() == [4096, 4120] and l.chunks.raw_length.tolist() == [24, 12]
        assert plan_extents(np.array([1, 2]), l.bundle_bytes).tolist() == [[0, 1]]  # bytes 12..36 of block 0
        expected = (np.arange(18, dtype=np.float16) / 4).reshape(3, 6)
        assert np.array_equal(layout.read_bundles(0, start=0, count=3), expected)


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate-golden"]:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    build_golden(GOLDEN)
    blob = GOLDEN.read_bytes()
    print(f"{GOLDEN}: {len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")
