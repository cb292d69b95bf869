"""The native read loop (runtime/nativeio.py) of the I/O threads and the demand reads on the calling
thread: the same bytes as the Python path, a hand-over to Python where the loop cannot finish, and the
rule that picks the calling thread. These readers use threads (``use_aio=False``) except where a test
compares the kernel's AIO queue (runtime/aio.py; its own cases: tests/test_runtime_aio.py) with them."""


import numpy as np
import pytest
from layouts import REGION_NEURONS as N
from layouts import REGION_OFFSET as OFFSET
from layouts import f16_region_file, short_region_file
from layouts import region_file as _region_file

from sparseflash.layout.format_extents import BLOCK
from sparseflash.runtime import nativeio
from sparseflash.runtime.iomodel import DeviceModel, QueueLevel
from sparseflash.runtime.planner import plan_reads
from sparseflash.runtime.streamer import BundleReader, StreamError

# the native function each read path runs: the I/O threads' loop, or the copy of the AIO queue's pieces
NATIVE_CALL = {"threads": "read_copy", "aio": "scatter_pieces"}
CHECKED_CALL = {"threads": "read_copy_checked", "aio": "scatter_pieces"}


def _direct_reader(path, region, engine="threads", **kw):
    reader = BundleReader(path, [region], DeviceModel(), use_aio=engine == "aio", **kw)
    if not (reader.direct and reader.native) or reader.engine != engine:
        reader.close()
        pytest.skip(f"no O_DIRECT (or no pread, or no AIO) here: the {engine} path is not used")
    return reader


@pytest.mark.parametrize("engine", ["threads", "aio"])
@pytest.mark.parametrize("bundle_bytes", [384, 1024, 5000, 12288])
def test_native_loop_gives_the_python_paths_bytes(tmp_path, monkeypatch, bundle_bytes, engine):
    path, region, expected = _region_file(tmp_path, bundle_bytes)
    calls = []
    real = getattr(nativeio, NATIVE_CALL[engine])
    monkeypatch.setattr(nativeio, NATIVE_CALL[engine], lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(7)
    for buffer_bytes in (4096, 16384, 1 << 20):  # small buffers: many pieces, bundles cut by their ends
        reader = _direct_reader(path, region, engine, threads=2, buffer_bytes=buffer_bytes)
        try:
            for _ in range(4):
                positions = np.sort(rng.choice(N, size=int(rng.integers(1, N)), replace=False))
                slots = rng.permutation(len(positions) + 3)[: len(positions)]
                got = {}
                for native in (True, False):
                    reader.native = native
                    dest = np.zeros((len(positions) + 3, bundle_bytes), dtype=np.uint8)
                    reader.read(0, positions, dest, slots)
                    got[native] = dest
                np.testing.assert_array_equal(got[True][slots], expected[positions])
                np.testing.assert_array_equal(got[True], got[False])
        finally:
            reader.close()
    assert calls  # the native loop ran


def test_a_piece_the_loop_cannot_finish_is_redone_in_python(tmp_path, monkeypatch):
    """The loop stops at a piece (here: told to after one piece per task); Python reads that piece and
    the rest, and the bundles cut between the two halves are still whole and exact."""
    path, region, expected = _region_file(tmp_path, 1000)
    real = nativeio.read_copy

    def first_piece_only(fd, offset, firsts, ends, los, his, *rest):
        stop = real(fd, offset, firsts[:1], ends[:1], los[:1], his[:1], *rest)
        return stop if stop >= 0 or len(firsts) == 1 else 1

    monkeypatch.setattr(nativeio, "read_copy", first_piece_only)
    python_pieces = []
    real_piece = BundleReader._read_piece
    monkeypatch.setattr(BundleReader, "_read_piece", lambda self, *a: python_pieces.append(a[1]) or real_piece(self, *a))
    reader = _direct_reader(path, region, threads=1, buffer_bytes=8192)
    try:
        positions = np.arange(0, N, 2)
        dest = np.zeros((len(positions), 1000), dtype=np.uint8)
        reader.read(0, positions, dest, np.arange(len(positions)))
        np.testing.assert_array_equal(dest, expected[positions])
        assert python_pieces  # the rest went through Python
    finally:
        reader.close()


def test_a_file_cut_short_is_a_stream_error_after_the_hand_over(tmp_path):
    short, region, _ = short_region_file(tmp_path, 4096, ends_in=40)
    reader = _direct_reader(short, region, threads=2, buffer_bytes=8192)
    try:
        dest = np.zeros((3, 4096), dtype=np.uint8)
        with pytest.raises(StreamError, match="unexpected end of file|Invalid argument"):
            reader.read(0, np.array([1, 40, 60]), dest, np.arange(3))
    finally:
        reader.close()


def test_a_small_demand_read_runs_on_the_calling_thread(tmp_path, monkeypatch):
    path, region, expected = _region_file(tmp_path, 1024)
    reader = BundleReader(path, [region], DeviceModel(latency_s=1e-4, bandwidth_bps=2e9,
                                                            levels=(QueueLevel(4, 2.5e-5, 2e9),)), threads=4,
                          buffer_bytes=8192, use_aio=False)
    handed = []
    real_submit = reader.pool.submit
    monkeypatch.setattr(reader.pool, "submit", lambda *a, **k: handed.append(a) or real_submit(*a, **k))
    try:
        assert 0 < reader.handoff_s < 1.0 and handed  # measured with round trips through the pool
        handed.clear()
        reader.handoff_s  # noqa: B018 (measured once, kept: no more round trips)
        assert not handed
        reader._handoff_s = 2e-4  # two disk latencies
        assert reader.tasks_for(1, 4096, inline_ok=True) == 0 and reader.tasks_for(2, 8192, inline_ok=True) == 0
        assert reader.tasks_for(40, 40 * 4096, inline_ok=True) > 0  # many pieces: in parallel on the I/O threads
        assert reader.tasks_for(1, 4096) == 1  # not a demand read: never on the caller's thread
        dest = np.zeros((2, 1024), dtype=np.uint8)
        future = reader.submit(0, np.array([4, 5]), dest, np.arange(2), inline_ok=True)
        assert future.done() and not handed  # read before submit returned, no hand-off
        np.testing.assert_array_equal(dest, expected[[4, 5]])  # one block
        assert future.result().requests == 1 and future.result().bytes == 4096 and future.result().inline
        assert not reader.submit(0, np.array([3, 4]), dest, np.arange(2)).result().inline  # not a demand read
        assert handed  # it went to the I/O threads
        handed.clear()
        reader._handoff_s = 0.0  # a hand-off that costs nothing: parallel always pays
        reader.submit(0, np.arange(0, N, 8), np.zeros((13, 1024), np.uint8), np.arange(13), inline_ok=True).result()
        assert handed
    finally:
        reader.close()


def test_inline_read_errors_come_back_through_the_future(tmp_path):
    path, region, _ = _region_file(tmp_path, 4096, tail=0)
    short = tmp_path / "short.bin"
    short.write_bytes(open(path, "rb").read()[: OFFSET + 10 * 4096])
    reader = BundleReader(str(short), [region], DeviceModel(), threads=2, buffer_bytes=8192, use_aio=False)
    reader._handoff_s = 1.0  # always inline
    try:
        future = reader.submit(0, np.array([50]), np.zeros((1, 4096), np.uint8), np.arange(1), inline_ok=True)
        assert future.done()
        with pytest.raises(StreamError):
            future.result()
    finally:
        reader.close()


@pytest.mark.parametrize("native,engine", [(True, "threads"), (False, "threads"), (True, "aio")])
def test_checks_are_the_same_in_the_loop_and_in_python(tmp_path, monkeypatch, native, engine):
    """Digests at every read, values at a bundle's first read only, in both paths: a bundle holding a NaN
    whose digest matches (a layout written wrong) is caught at its first read and not after it was
    found finite; a byte changed on disk is caught by the digest even for a bundle seen before."""
    bb = 512  # f16 bundles of 256 values, 8 to a block
    path, region, values = f16_region_file(tmp_path, bb, 64, nan_at=(7, 100))
    calls = []
    real = getattr(nativeio, CHECKED_CALL[engine])
    monkeypatch.setattr(nativeio, CHECKED_CALL[engine], lambda *a: calls.append(1) or real(*a))
    reader = BundleReader(str(path), [region], DeviceModel(), threads=2, buffer_bytes=8192, verify=True,
                          use_aio=engine == "aio")
    reader.native = native and reader.native
    if native and not (reader.native and reader.direct and nativeio.CHECKS and reader.engine == engine):
        reader.close()
        pytest.skip(f"the native checks ({engine}) are not available here")
    dest = np.zeros((4, bb // 2), dtype=np.float16)
    try:
        with pytest.raises(StreamError, match="stored neuron 7.*non-finite"):
            reader.read(0, np.array([3, 7, 9]), dest, np.arange(3))
        assert not reader.finite[0][7]
        reader.read(0, np.array([3, 5, 9]), dest, np.arange(3))
        np.testing.assert_array_equal(dest[:3], values[[3, 5, 9]])
        assert reader.finite[0][[3, 5, 9]].all()
        reader.finite[0][7] = True  # as if found finite before: its digest matches, so it is not scanned again
        reader.read(0, np.array([7]), dest, np.arange(1))
        blob = bytearray(path.read_bytes())
        blob[OFFSET + 5 * bb + 10] ^= 0x01  # neuron 5 changes on disk after it was read and scanned
        path.write_bytes(bytes(blob))
        with pytest.raises(StreamError, match=r"digests\[5\]"):
            reader.read(0, np.array([5]), dest, np.arange(1))
    finally:
        reader.close()
    assert bool(calls) == native



def test_a_read_is_dealt_to_as_many_threads_as_pay_for_their_hand_off(tmp_path, monkeypatch):
    path, region, expected = _region_file(tmp_path, 4096)
    disk = DeviceModel(latency_s=1e-4, bandwidth_bps=2e9,
                       levels=(QueueLevel(2, 5e-5, 2e9), QueueLevel(4, 2.5e-5, 2e9)))
    reader = BundleReader(path, [region], disk, threads=4, buffer_bytes=4096, use_aio=False)
    handed = []
    real_submit = reader.pool.submit
    monkeypatch.setattr(reader.pool, "submit", lambda *a, **k: handed.append(a) or real_submit(*a, **k))
    try:
        reader._handoff_s = 1e-3  # a hand-off costs ten disk latencies
        assert reader.tasks_for(4, 4 * 4096) == 1
        assert reader.tasks_for(200, 200 * 4096) == 4  # 15 ms of latency saved: worth three more hand-offs
        reader._handoff_s = 0.0
        assert reader.tasks_for(4, 4 * 4096) == 4 and reader.tasks_for(1, 4096) == 1
        reader._handoff_s = 1e-3
        positions = np.array([0, 10, 20, 30])  # four pieces
        dest = np.zeros((4, 4096), dtype=np.uint8)
        reader.read(0, positions, dest, np.arange(4))
        assert len(handed) == 1  # one task read all four
        np.testing.assert_array_equal(dest, expected[positions])
    finally:
        reader.close()


@pytest.mark.parametrize("bundle_bytes", [1024, 3000, 4096, 9000])
def test_native_piece_plan_equals_plan_reads(bundle_bytes):
    """nativeio.plan_pieces gives plan_reads' pieces and, per piece, the positions whose bytes it holds."""
    rng = np.random.default_rng(bundle_bytes)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        positions = np.unique(rng.choice(n, int(rng.integers(1, n + 1)), replace=True)).astype(np.int64)
        gap, most = int(rng.integers(0, 4)), int(rng.integers(1, 9))
        pieces = np.asarray(plan_reads(positions, bundle_bytes, gap, most), dtype=np.int64).reshape(-1, 2)
        firsts, ends, los, his = nativeio.plan_pieces(positions, bundle_bytes, gap, most)
        np.testing.assert_array_equal(firsts, pieces[:, 0])
        np.testing.assert_array_equal(ends, pieces[:, 1])
        for f, e, lo, hi in zip(firsts, ends, los, his):
            overlaps = (positions * bundle_bytes < e * BLOCK) & ((positions + 1) * bundle_bytes > f * BLOCK)
            assert np.flatnonzero(overlaps).tolist() == list(range(lo, hi))
