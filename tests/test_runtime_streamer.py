"""The bundle reader under injected faults: short reads, EINTR, EIO, direct I/O refused."""

import errno
import os

import numpy as np
import pytest
from layouts import tiny_layout

from sparseflash.layout.format import LayoutFile
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.streamer import BundleReader, StreamError


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    _, path = tiny_layout(tmp_path_factory.mktemp("lay"), "nemotron", dtype="f16")
    with LayoutFile.open(path) as f:
        regions = list(f.layers)
        expected = [f.read_bundles(l, start=0, count=r.n_neurons) for l, r in enumerate(regions)]
    return str(path), regions, expected


def _read(reader, regions, layer, positions):
    dest = np.zeros((len(positions), regions[layer].bundle_len), dtype=np.float16)
    res = reader.read(layer, np.array(positions), dest, np.arange(len(positions)))
    return dest, res


@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_reads_exact_bundles(layout, io):
    path, regions, expected = layout
    reader = BundleReader(path, regions, DeviceModel(), io=io, threads=3, buffer_bytes=8192)
    try:
        positions = [0, 1, 5, 17, 18, 19, 100, 159]
        dest, res = _read(reader, regions, 1, positions)
        assert np.array_equal(dest, expected[1][positions])
        assert res.requests >= 1 and res.bytes % 4096 == 0
    finally:
        reader.close()


def _faulty(kind):
    calls = {"n": 0}

    def preadv(fd, bufs, offset):
        calls["n"] += 1
        view = bufs[0]
        if kind == "short" and len(view) > 1000:
            return os.preadv(fd, [view[: len(view) // 3]], offset)  # a third, then the caller must continue
        if kind == "eintr" and calls["n"] % 2 == 1:
            raise InterruptedError(errno.EINTR, "interrupted")
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if kind == "einval" and calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.preadv(fd, bufs, offset)

    return preadv, calls


@pytest.mark.parametrize("kind", ["short", "eintr", "einval"])
def test_recoverable_faults_still_give_exact_bytes(layout, kind):
    path, regions, expected = layout
    preadv, calls = _faulty(kind)
    reader = BundleReader(path, regions, DeviceModel(), io="buffered" if kind != "einval" else "direct",
                          threads=2, buffer_bytes=16384, preadv=preadv)
    if kind == "einval":
        reader.direct = True  # as if O_DIRECT had been granted and then refused for a read
    try:
        positions = list(range(0, 160, 3))
        dest, _ = _read(reader, regions, 0, positions)
        assert np.array_equal(dest, expected[0][positions])
        assert calls["n"] > 1
    finally:
        reader.close()


def test_eio_is_reported_with_file_and_offset(layout):
    path, regions, _ = layout
    preadv, _ = _faulty("eio")
    reader = BundleReader(path, regions, DeviceModel(), io="buffered", threads=2, preadv=preadv)
    try:
        with pytest.raises(StreamError, match=rf"{os.path.basename(path)}.*Input/output error.*at offset \d+"):
            _read(reader, regions, 1, [3, 4])
    finally:
        reader.close()


def test_engine_cache_stays_consistent_after_eio(tmp_path):
    import torch

    from sparseflash.runtime.build import build_engine
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.policy import Budget, Policy

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", n_hot=4)
    lm = open_layout(path)
    fail = {"on": False}

    def factory(*args, **kw):
        def preadv(fd, bufs, offset):
            if fail["on"]:
                raise OSError(errno.EIO, "Input/output error")
            return os.preadv(fd, bufs, offset)
        return BundleReader(*args, preadv=preadv, **kw)

    policy = Policy(Budget(nbytes=1 << 30), strategy="all", lookahead=False)
    eng, _ = build_engine(lm, policy, DeviceModel(), reader_factory=factory)
    try:
        fail["on"] = True
        with pytest.raises(StreamError):
            eng(0, torch.randn(1, lm.config.hidden_size))
        for cache in eng.caches:
            cache.check()
            assert cache.used == 4  # only the pinned hot region: nothing half-read was committed
        fail["on"] = False
        y = eng(0, torch.randn(1, lm.config.hidden_size))  # and the engine works again
        assert torch.isfinite(y).all()
    finally:
        eng.close()
        lm.close()


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(StreamError, match="cannot open"):
        BundleReader(str(tmp_path / "missing.sflash"), [], DeviceModel())


@pytest.mark.parametrize("bundle_bytes", [384, 1000, 4096, 5000, 12288])
def test_reads_exact_bundles_of_any_size_across_piece_ends(tmp_path, bundle_bytes):
    """Bundles that do not divide the 4 KiB block, or span several pieces, still arrive byte-exact."""
    from types import SimpleNamespace

    n, offset = 97, 3 * 4096
    rng = np.random.default_rng(bundle_bytes)
    data = rng.integers(0, 256, n * bundle_bytes, dtype=np.uint8)
    path = tmp_path / "region.bin"
    path.write_bytes(bytes(offset) + data.tobytes() + bytes(4096))
    region = SimpleNamespace(offset=offset, bundle_bytes=bundle_bytes, length=n * bundle_bytes)
    expected = data.reshape(n, bundle_bytes)
    for buffer_bytes in (4096, 8192, 1 << 20):  # small buffers cut extents into many pieces
        reader = BundleReader(str(path), [region], DeviceModel(), threads=2, buffer_bytes=buffer_bytes)
        try:
            for _ in range(5):
                positions = np.sort(rng.choice(n, size=int(rng.integers(1, n)), replace=False))
                dest = np.zeros((len(positions) + 3, bundle_bytes), dtype=np.uint8)
                slots = rng.permutation(len(positions) + 3)[: len(positions)]
                reader.read(0, positions, dest, slots)
                assert np.array_equal(dest[slots], expected[positions])
        finally:
            reader.close()


def test_values_are_scanned_at_a_bundles_first_read_and_digests_at_every_read(layout, monkeypatch, tmp_path):
    """A matching digest means the bytes already found finite; a later read is still digest-checked."""
    from sparseflash.runtime import bundle_checks

    path, regions, expected = layout
    scanned = []
    real = bundle_checks._first_non_finite

    def counted(rows, region, index=None):
        scanned.append(len(rows) if index is None else len(index))
        return real(rows, region, index)

    monkeypatch.setattr(bundle_checks, "_first_non_finite", counted)
    reader = BundleReader(path, regions, DeviceModel(), threads=2, buffer_bytes=8192, verify=True)
    reader.native = False  # the Python path's scans are counted here (the native loop's: test_runtime_nativeio)
    try:
        first = [0, 1, 5, 17, 18, 19, 100, 159]
        dest, _ = _read(reader, regions, 1, first)
        np.testing.assert_array_equal(dest, expected[1][first])
        assert sum(scanned) == len(first)
        dest, _ = _read(reader, regions, 1, [5, 17, 20, 159])  # three seen, one new
        np.testing.assert_array_equal(dest, expected[1][[5, 17, 20, 159]])
        assert sum(scanned) == len(first) + 1
        assert set(np.flatnonzero(reader.finite[1])) == {*first, 20} and not reader.finite[0].any()
    finally:
        reader.close()
    # the same neurons changed on disk: caught by their digests although their values were scanned before
    bad = tmp_path / "changed.sflash"
    blob = bytearray(open(path, "rb").read())
    r = regions[1]
    blob[r.offset + 17 * r.bundle_bytes + 3] ^= 0x20
    bad.write_bytes(bytes(blob))
    reader = BundleReader(str(bad), regions, DeviceModel(), threads=2, buffer_bytes=8192, verify=True)
    reader.finite[1][:] = True
    try:
        with pytest.raises(StreamError, match=r"digests\[17\]"):
            _read(reader, regions, 1, [16, 17])
    finally:
        reader.close()


def test_a_run_of_rows_is_copied_through_a_slice():
    from sparseflash.runtime.streamer import _run_or_index

    assert _run_or_index(np.array([3, 4, 5])) == slice(3, 6)
    assert _run_or_index(np.array([7])) == slice(7, 8)
    for rows in ([3, 5, 6], [4, 3], []):
        assert isinstance(_run_or_index(np.array(rows, dtype=np.int64)), np.ndarray)
