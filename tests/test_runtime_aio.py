"""Reads through the kernel's AIO queue (runtime/aio.py), the reader's default where Linux has it: reads
that wait for room in the arena or for free queue entries, a read that lands while the caller works,
short pieces redone (and named) in Python, a refused submit. Its bytes and checks against the Python
path and the threads: tests/test_runtime_nativeio.py."""

import time

import numpy as np
import pytest
from layouts import REGION_NEURONS as N
from layouts import region_file as _region_file
from layouts import short_region_file

from sparseflash.runtime import aio
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.streamer import BundleReader, StreamError

pytestmark = pytest.mark.skipif(not aio.available(), reason="no Linux AIO here: readers use threads")


def _aio_reader(path, region, disk=None, **kw):
    reader = BundleReader(path, [region], disk or DeviceModel(), **kw)
    if reader.engine != "aio":
        reader.close()
        pytest.skip("no O_DIRECT on this file system: the reader uses threads")
    return reader


def test_reads_in_flight_together_wait_for_arena_room_and_queue_entries(tmp_path, monkeypatch):
    """More pieces than the queue holds, and reads that do not all fit the arena at once: each waits for
    room (completing the others), and every read ends with its own bytes."""
    monkeypatch.setattr(aio, "MAX_EVENTS", 4)
    path, region, expected = _region_file(tmp_path, 4096)
    disk = DeviceModel(latency_s=1e-6, bandwidth_bps=1e9)  # no gap is worth reading through
    reader = _aio_reader(path, region, disk, threads=2, buffer_bytes=8 * 4096)  # an arena of 16 blocks
    try:
        assert reader.aio.blocks == 16 and reader.merge_gap_blocks == 0
        reads = []
        for k in range(6):  # each 10 scattered one-block pieces: the arena holds one read and a half
            positions = np.arange(k, N, 9)[:10]
            dest = np.zeros((10, 4096), dtype=np.uint8)
            reads.append((reader.submit(0, positions, dest, np.arange(10)), positions, dest))
        for future, positions, dest in reads:
            assert future.result().requests == 10
            np.testing.assert_array_equal(dest, expected[positions])
        assert reader.aio._free == [(0, 16)] and not reader.aio._reads and reader.aio._inflight == 0  # all given back
    finally:
        reader.close()


def test_a_look_ahead_read_lands_while_the_caller_works_and_is_seen_by_done(tmp_path):
    path, region, expected = _region_file(tmp_path, 1024)
    reader = _aio_reader(path, region, threads=2, buffer_bytes=1 << 16)
    try:
        dest = np.zeros((5, 1024), dtype=np.uint8)
        future = reader.submit(0, np.array([1, 30, 31, 60, 90]), dest, np.arange(5))
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:  # the kernel completes it without this thread
            time.sleep(1e-4)
        assert future.done() and future.exception() is None
        np.testing.assert_array_equal(dest, expected[[1, 30, 31, 60, 90]])
        r = future.result()  # its span, and the model's time for its pieces all in flight at once
        assert r.start <= r.end and r.seconds == pytest.approx(r.end - r.start) and r.model_s > 0
        assert r.bytes % 4096 == 0 and r.requests >= 1
    finally:
        reader.close()


def test_a_short_piece_is_redone_in_python_and_a_file_cut_short_is_a_stream_error(tmp_path, monkeypatch):
    short, region, expected = short_region_file(tmp_path, 4096, ends_in=40)
    redone = []
    real_piece = BundleReader._read_piece
    monkeypatch.setattr(BundleReader, "_read_piece", lambda self, *a: redone.append(a[1]) or real_piece(self, *a))
    reader = _aio_reader(short, region, threads=2, buffer_bytes=8192)
    try:
        dest = np.zeros((3, 4096), dtype=np.uint8)
        with pytest.raises(StreamError, match="unexpected end of file|Invalid argument"):
            reader.read(0, np.array([1, 40, 60]), dest, np.arange(3))
        assert redone  # the pieces the kernel read short went through Python, which names the error
        assert reader.aio._free == [(0, reader.aio.blocks)]  # the failed read gave its arena back
        dest[:] = 0
        reader.read(0, np.array([2, 3]), dest, np.arange(2))  # the queue still works
        np.testing.assert_array_equal(dest[:2], expected[[2, 3]])
    finally:
        reader.close()


def test_a_refused_submit_is_a_stream_error_and_close_waits_for_reads_in_flight(tmp_path, monkeypatch):
    path, region, expected = _region_file(tmp_path, 4096)
    reader = _aio_reader(path, region, threads=2, buffer_bytes=1 << 16)
    try:
        dest = np.zeros((2, 4096), dtype=np.uint8)
        inflight = reader.submit(0, np.array([5, 50]), dest, np.arange(2))
        real = aio._syscall

        def refuse(number, *args):
            if number == reader.aio._submit:
                raise OSError(22, "Invalid argument")
            return real(number, *args)

        monkeypatch.setattr(aio, "_syscall", refuse)
        with pytest.raises(StreamError, match="Invalid argument queueing"):
            reader.read(0, np.array([1]), np.zeros((1, 4096), np.uint8), np.arange(1))
        monkeypatch.setattr(aio, "_syscall", real)
    finally:
        reader.close()  # waits for the read in flight
    assert inflight.done()
    np.testing.assert_array_equal(dest, expected[[5, 50]])
