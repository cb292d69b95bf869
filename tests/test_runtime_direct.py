"""Reads straight into the destination rows (runtime/aio_reads.py ``direct_plan``): runs of bundles
consecutive in the file and in the rows, read by AIO into page-aligned rows with no I/O buffer and no
copy, where bundles sit on 4096-byte boundaries and the device model prices it no slower than the
buffered plan. The same bytes as the buffered path, its checks in place, short pieces redone."""

import numpy as np
import pytest
from layouts import REGION_OFFSET as OFFSET
from layouts import f16_region_file, short_region_file
from layouts import region_file as _region_file

from sparseflash.runtime import aio, nativeio
from sparseflash.runtime.aligned import aligned_zeros
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.streamer import BundleReader, StreamError

pytestmark = pytest.mark.skipif(not aio.available(), reason="no Linux AIO here: readers use threads")


def _reader(path, regions, disk=None, **kw):
    reader = BundleReader(path, regions, disk or DeviceModel(), **kw)
    if reader.engine != "aio" or not reader.native:
        reader.close()
        pytest.skip("no O_DIRECT or no pread on this file system: no direct reads")
    return reader


def _counting(monkeypatch, name):
    calls = []
    real = getattr(nativeio, name)
    monkeypatch.setattr(nativeio, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_aligned_zeros_are_page_aligned_zeroed_and_writable():
    a = aligned_zeros((3, 5000), np.float16)
    assert a.ctypes.data % 4096 == 0 and a.shape == (3, 5000) and a.dtype == np.float16 and not a.any()
    a[2, 4999] = 1.5
    assert a.sum() == 1.5 and aligned_zeros((0, 7), np.uint8).shape == (0, 7)


@pytest.mark.parametrize("bundle_bytes", [4096, 12288])
def test_runs_of_rows_are_read_straight_in_with_the_buffered_paths_bytes(tmp_path, monkeypatch, bundle_bytes):
    path, region, expected = _region_file(tmp_path, bundle_bytes)
    copies = _counting(monkeypatch, "scatter_pieces")
    reader = _reader(path, [region], threads=2, buffer_bytes=4 * bundle_bytes)
    most = 4  # bundles per direct piece: as many as fill an I/O buffer
    try:
        positions = np.concatenate([np.arange(3, 40), np.arange(50, 61)])  # two runs in the file
        dest = aligned_zeros((len(positions) + 4, bundle_bytes), np.uint8)
        read = reader.submit(0, positions, dest, np.arange(2, 2 + len(positions)))
        assert read.blocks == 0  # no arena room taken: the rows are the buffer
        result = read.result()
        assert result.requests == -(-37 // most) + -(-11 // most) and result.bytes == len(positions) * bundle_bytes
        np.testing.assert_array_equal(dest[2 : 2 + len(positions)], expected[positions])
        assert not dest[:2].any() and not dest[-2:].any()  # rows outside the read untouched
        assert not copies
        slots = np.random.default_rng(1).permutation(len(positions) + 4)[: len(positions)]  # scattered rows
        dest[:] = 0
        reader.read(0, positions, dest, slots)
        np.testing.assert_array_equal(dest[slots], expected[positions])
        assert reader.aio._free == [(0, reader.aio.blocks)] and not reader.aio._reads
    finally:
        reader.close()


def test_direct_pieces_take_at_least_a_buffer_so_runs_need_no_more_requests(tmp_path, monkeypatch):
    """Bundles of 3 blocks, buffers of 4: the buffered plan cuts a run of 8 bundles into 6 pieces; direct
    pieces of a buffer's worth rounded up (2 bundles) need 4, rounded down (1) would need 8 and lose."""
    copies = _counting(monkeypatch, "scatter_pieces")
    path, region, expected = _region_file(tmp_path, 3 * 4096)
    reader = _reader(path, [region], threads=2, buffer_bytes=4 * 4096)
    try:
        dest = aligned_zeros((8, 3 * 4096), np.uint8)
        read = reader.submit(0, np.arange(30, 38), dest, np.arange(8))
        assert read.blocks == 0 and read.result().requests == 4
        np.testing.assert_array_equal(dest, expected[30:38])
        assert not copies
    finally:
        reader.close()


def test_rows_the_disk_cannot_fill_directly_take_the_buffered_path(tmp_path, monkeypatch):
    copies = _counting(monkeypatch, "scatter_pieces")
    path, region, expected = _region_file(tmp_path, 4096)
    reader = _reader(path, [region], threads=2, buffer_bytes=4 * 4096)
    try:
        positions = np.arange(10, 14)
        unaligned = aligned_zeros((4 * 4096 + 64,), np.uint8)[64:].reshape(4, 4096)  # rows off the page grid
        reader.read(0, positions, unaligned, np.arange(4))
        np.testing.assert_array_equal(unaligned, expected[positions])
        assert len(copies) == 1
    finally:
        reader.close()
    path, region, expected = _region_file(tmp_path, 5000)  # bundles across block boundaries
    reader = _reader(path, [region], threads=2, buffer_bytes=4 * 4096)
    try:
        dest = aligned_zeros((4, 5000), np.uint8)
        reader.read(0, positions, dest, np.arange(4))
        np.testing.assert_array_equal(dest, expected[positions])
        assert len(copies) == 2
    finally:
        reader.close()


def test_the_device_model_keeps_reading_through_gaps_where_requests_cost_more(tmp_path, monkeypatch):
    """Every other bundle: direct reads need a request per bundle, the buffered plan one request that
    reads the gaps through. With costly requests the buffered plan wins; with free ones, direct."""
    copies = _counting(monkeypatch, "scatter_pieces")
    path, region, expected = _region_file(tmp_path, 4096)
    positions = np.arange(20, 36, 2)
    for disk, buffered in ((DeviceModel(latency_s=1e-3, bandwidth_bps=1e9), True),
                           (DeviceModel(latency_s=1e-9, bandwidth_bps=1e9), False)):
        reader = _reader(path, [region], disk, threads=2, buffer_bytes=16 * 4096)
        try:
            before = len(copies)
            dest = aligned_zeros((len(positions), 4096), np.uint8)
            result = reader.read(0, positions, dest, np.arange(len(positions)))
            np.testing.assert_array_equal(dest, expected[positions])
            assert (len(copies) > before) == buffered
            assert result.requests == (1 if buffered else len(positions))
        finally:
            reader.close()


def test_a_short_direct_piece_is_redone_in_python_and_a_file_cut_short_is_a_stream_error(tmp_path, monkeypatch):
    short, region, expected = short_region_file(tmp_path, 4096, ends_in=40)
    redone = []
    real_piece = BundleReader._read_piece
    monkeypatch.setattr(BundleReader, "_read_piece", lambda self, *a: redone.append(a[1]) or real_piece(self, *a))
    reader = _reader(short, [region], threads=2, buffer_bytes=2 * 4096)
    try:
        dest = aligned_zeros((6, 4096), np.uint8)
        with pytest.raises(StreamError, match="unexpected end of file|Invalid argument"):
            reader.read(0, np.arange(37, 43), dest, np.arange(6))
        assert redone
        dest[:] = 0
        reader.read(0, np.array([2, 3]), dest, np.arange(2))  # the queue still works
        np.testing.assert_array_equal(dest[:2], expected[[2, 3]])
    finally:
        reader.close()


def test_direct_reads_are_checked_in_place(tmp_path, monkeypatch):
    """Digests at every read and values at a bundle's first read, on rows the disk filled directly: a NaN
    whose digest matches (a layout written wrong) and a byte changed on disk are both caught."""
    bb = 4096  # f16 bundles of 2048 values, one to a block
    path, region, values = f16_region_file(tmp_path, bb, 24, nan_at=(7, 100))
    checks = _counting(monkeypatch, "check_rows")
    reader = _reader(str(path), [region], threads=2, buffer_bytes=8192, verify=True)
    if not nativeio.CHECKS:
        reader.close()
        pytest.skip("no native digest here")
    dest = aligned_zeros((4, bb // 2), np.float16)
    try:
        with pytest.raises(StreamError, match="stored neuron 7.*non-finite"):
            reader.read(0, np.array([6, 7, 8]), dest, np.arange(3))
        reader.read(0, np.array([3, 4, 5]), dest, np.arange(3))
        np.testing.assert_array_equal(dest[:3], values[[3, 4, 5]])
        assert reader.finite[0][[3, 4, 5]].all() and not reader.finite[0][7]
        blob = bytearray(path.read_bytes())
        blob[OFFSET + 5 * bb + 10] ^= 0x01  # neuron 5 changes on disk after it was read and scanned
        path.write_bytes(bytes(blob))
        with pytest.raises(StreamError, match=r"digests\[5\]"):
            reader.read(0, np.array([4, 5]), dest, np.arange(2))
    finally:
        reader.close()
    assert len(checks) == 3
