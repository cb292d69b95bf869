"""Reads through the kernel's AIO queue (runtime/aio.py), the reader's default where Linux has it: the
same bytes and checks as the Python path, every piece of a read in flight at once, reads that wait for
room in the arena or for free queue entries, short pieces redone (and named) in Python, and the engine
on top of it."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from sparseflash.runtime import aio, nativeio
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.streamer import BundleReader, StreamError

N, OFFSET = 97, 3 * 4096

pytestmark = pytest.mark.skipif(not aio.available(), reason="no Linux AIO here: readers use threads")


def _region_file(tmp_path, bundle_bytes, tail=4096):
    rng = np.random.default_rng(bundle_bytes)
    data = rng.integers(0, 256, N * bundle_bytes, dtype=np.uint8)
    path = tmp_path / f"region-{bundle_bytes}.bin"
    path.write_bytes(bytes(OFFSET) + data.tobytes() + bytes(tail))
    region = SimpleNamespace(offset=OFFSET, bundle_bytes=bundle_bytes, length=N * bundle_bytes)
    return str(path), region, data.reshape(N, bundle_bytes)


def _aio_reader(path, region, disk=None, **kw):
    reader = BundleReader(path, [region], disk or DeviceModel(), **kw)
    if reader.engine != "aio":
        reader.close()
        pytest.skip("no O_DIRECT on this file system: the reader uses threads")
    return reader


@pytest.mark.parametrize("bundle_bytes", [384, 1024, 5000, 12288])
def test_aio_reads_give_the_python_paths_bytes(tmp_path, monkeypatch, bundle_bytes):
    path, region, expected = _region_file(tmp_path, bundle_bytes)
    calls = []
    real = nativeio.scatter_pieces
    monkeypatch.setattr(nativeio, "scatter_pieces", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(7)
    for buffer_bytes in (4096, 16384, 1 << 20):  # small buffers: many pieces, bundles cut by their ends
        reader = _aio_reader(path, region, threads=2, buffer_bytes=buffer_bytes)
        try:
            for _ in range(4):
                positions = np.sort(rng.choice(N, size=int(rng.integers(1, N)), replace=False))
                slots = rng.permutation(len(positions) + 3)[: len(positions)]
                got = {}
                for native in (True, False):
                    reader.native = native
                    dest = np.zeros((len(positions) + 3, bundle_bytes), dtype=np.uint8)
                    result = reader.read(0, positions, dest, slots)
                    got[native] = dest
                    if native:  # the pieces' bytes and the model's time at their own queue depth
                        assert result.bytes % 4096 == 0 and result.requests >= 1 and result.model_s > 0
                np.testing.assert_array_equal(got[True][slots], expected[positions])
                np.testing.assert_array_equal(got[True], got[False])
        finally:
            reader.close()
    assert calls  # the AIO path ran


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
        assert reader.aio._free == [(0, 16)] and not reader.aio._pieces  # all given back
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
        r = future.result()
        assert r.start <= r.end and r.seconds == pytest.approx(r.end - r.start)
    finally:
        reader.close()


def test_a_short_piece_is_redone_in_python_and_a_file_cut_short_is_a_stream_error(tmp_path, monkeypatch):
    path, region, expected = _region_file(tmp_path, 4096, tail=0)
    short = tmp_path / "short.bin"
    short.write_bytes(open(path, "rb").read()[: OFFSET + 40 * 4096 + 100])  # ends inside bundle 40
    redone = []
    real_piece = BundleReader._read_piece
    monkeypatch.setattr(BundleReader, "_read_piece", lambda self, *a: redone.append(a[1]) or real_piece(self, *a))
    reader = _aio_reader(str(short), region, threads=2, buffer_bytes=8192)
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


def test_aio_checks_digests_at_every_read_and_values_at_the_first(tmp_path):
    from sparseflash.layout.format import record_digests

    bb, n = 512, 64
    values = np.random.default_rng(3).standard_normal((n, bb // 2)).astype(np.float16)
    values[7, 100] = np.nan
    path = tmp_path / "f16.bin"
    path.write_bytes(bytes(OFFSET) + values.tobytes() + bytes(4096))
    region = SimpleNamespace(offset=OFFSET, bundle_bytes=bb, length=n * bb, n_neurons=n, index=0, dtype="f16",
                             digests=record_digests(values))
    reader = _aio_reader(str(path), region, threads=2, buffer_bytes=8192, verify=True)
    dest = np.zeros((4, bb // 2), dtype=np.float16)
    try:
        with pytest.raises(StreamError, match="stored neuron 7.*non-finite"):
            reader.read(0, np.array([3, 7, 9]), dest, np.arange(3))
        reader.read(0, np.array([3, 5, 9]), dest, np.arange(3))
        np.testing.assert_array_equal(dest[:3], values[[3, 5, 9]])
        assert reader.finite[0][[3, 5, 9]].all()
        blob = bytearray(path.read_bytes())
        blob[OFFSET + 5 * bb + 10] ^= 0x01  # neuron 5 changes on disk after it was read and scanned
        path.write_bytes(bytes(blob))
        with pytest.raises(StreamError, match=r"digests\[5\]"):
            reader.read(0, np.array([5]), dest, np.arange(1))
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
