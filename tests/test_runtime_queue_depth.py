"""The queue-depth device model: per-depth fits, old files, the probe's parallel reads, and how the
reader and a streamed run use it (reads in flight, request size, modelled time of the same reads)."""

import json
import os
import time

import numpy as np
import pytest
from layouts import tiny_layout

from sparseflash.errors import SparseflashError
from sparseflash.layout.format import LayoutFile
from sparseflash.runtime import diskprobe
from sparseflash.runtime.iomodel import DEFAULT_IO, DeviceModel, QueueLevel
from sparseflash.runtime.policy import Budget
from sparseflash.runtime.session import io_policy
from sparseflash.runtime.streamer import BundleReader

# a disk that is 3x faster with 8 reads in flight than with one
FAST_DEEP = DeviceModel(100e-6, 1e9, "test", (QueueLevel(1, 100e-6, 1e9), QueueLevel(4, 25e-6, 3e9),
                                               QueueLevel(8, 12e-6, 3.1e9)))


def test_an_old_device_model_file_loads_as_qd1_only(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"latency_s": 1e-4, "bandwidth_bps": 1e9}))
    model = DeviceModel.from_file(path)
    assert model.levels == () and model.depths == (1,)
    assert model.read_time(10, 1e6, depth=8) == pytest.approx(10 * 1e-4 + 1e6 / 1e9)  # QD1 prices every depth


def test_levels_round_trip_and_price_the_depth_in_use(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(FAST_DEEP.to_dict()))
    model = DeviceModel.from_file(path)
    assert model == FAST_DEEP and model.depths == (1, 4, 8)
    assert model.read_time(16, 16e6, depth=8) == pytest.approx(16 * 12e-6 + 16e6 / 3.1e9)
    assert model.read_time(16, 16e6, depth=6) == pytest.approx(16 * 25e-6 + 16e6 / 3e9)  # deepest measured <= 6
    assert model.read_time(2, 2e6, depth=8) == pytest.approx(model.read_time(2, 2e6, depth=1))  # 2 reads: 2 in flight
    assert model.gap_bytes(8) == int(12e-6 * 3.1e9) // 4096 * 4096


@pytest.mark.parametrize("levels", [[{"depth": 0, "latency_s": 1e-4, "bandwidth_bps": 1e9}],
                                    [{"depth": 4, "latency_s": 1e-4, "bandwidth_bps": -1}], "nonsense"])
def test_bad_levels_are_one_line(levels, tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"latency_s": 1e-4, "bandwidth_bps": 1e9, "levels": levels}))
    with pytest.raises(SparseflashError, match=str(path)):
        DeviceModel.from_file(path)


def test_plan_io_takes_the_largest_requests_and_fewest_in_flight_near_the_best_throughput():
    depth, size = FAST_DEEP.plan_io(1 << 20, 32 << 20)
    options = {(q, s): FAST_DEEP.level(q).throughput(s) for q in (1, 4, 8) for s in (4096 << k for k in range(9))}
    best = max(options.values())
    assert options[(depth, size)] >= 0.95 * best
    assert size == 1 << 20  # 1 MiB at some depth is near the best: no smaller requests
    assert all(t < 0.95 * best for (q, s), t in options.items() if s == size and q < depth)
    assert depth > 1  # this disk wants reads in flight
    small = FAST_DEEP.plan_io(1 << 20, 256 << 10)  # buffers must fit 256 KiB
    assert small[0] * small[1] <= 256 << 10
    assert DeviceModel().plan_io() == DEFAULT_IO  # nothing measured: the old default
    assert FAST_DEEP.plan_io(request_bytes=8192)[1] == 8192


def test_probe_reads_in_parallel_at_each_depth(tmp_path, monkeypatch):
    """A fake disk with 2 ms per read whatever the size and no limit on reads in flight: QD4's fitted
    throughput must be several times QD1's (the reads overlap), else the threads are not parallel."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(8 << 20))

    def slow(fd, bufs, offset):
        time.sleep(0.002)
        return len(bufs[0])
    monkeypatch.setattr(os, "preadv", slow)
    model, rows = diskprobe.probe_file(path, seconds_per_size=0.03, depths=(2, 4), seconds_per_depth=0.06)
    assert model.depths == (1, 2, 4) and {r["depth"] for r in rows} == {1, 2, 4}
    qd1, qd4 = model.level(1).throughput(65536), model.level(4).throughput(65536)
    assert qd4 > 2.5 * qd1
    assert "queue depths 1, 2, 4" in model.source


def test_probe_of_a_real_file_gives_finite_levels(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    model, _ = diskprobe.probe_file(path, seconds_per_size=0.01, depths=(4,), seconds_per_depth=0.02)
    for lv in model.levels:
        assert np.isfinite(lv.latency_s) and lv.latency_s > 0 and lv.bandwidth_bps > 0


def test_a_cached_model_without_depths_is_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(1 << 20))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"device-{os.stat(path).st_dev}.json").write_text(json.dumps({"latency_s": 1e-4, "bandwidth_bps": 1e9}))
    monkeypatch.setattr(diskprobe, "probe_file", lambda p: (FAST_DEEP, []))
    assert diskprobe.device_model_for(path, cache_dir=cache, note=pytest.fail) == FAST_DEEP
    monkeypatch.setattr(diskprobe, "probe_file", pytest.fail)  # now cached with its depths
    assert diskprobe.device_model_for(path, cache_dir=cache, note=pytest.fail) == FAST_DEEP


def test_probe_command_measures_again_and_replaces_the_cached_model(tmp_path, monkeypatch, capsys):
    from sparseflash.tools.cli import main

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(1 << 20))
    monkeypatch.setenv("SPARSEFLASH_CACHE", str(tmp_path / "cache"))
    cached = diskprobe.cache_file_for(path)
    cached.parent.mkdir()
    stale = DeviceModel(100e-6, 2.3e9, "an older probe", (QueueLevel(1, 100e-6, 2.3e9), QueueLevel(4, 50e-6, 2.1e9)))
    cached.write_text(json.dumps(stale.to_dict()))
    assert diskprobe.device_model_for(path, note=pytest.fail) == stale  # a run reuses the cache
    monkeypatch.setattr(diskprobe, "probe_file", lambda p: (FAST_DEEP, []))
    assert main(["probe", "-m", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache_file"] == str(cached) and DeviceModel.from_dict(out) == FAST_DEEP
    assert DeviceModel.from_file(cached) == FAST_DEEP  # replaced: the next run plans from the new figures
    assert main(["probe", "-m", str(path)]) == 0
    assert "4 in flight" in capsys.readouterr().out

    def broken(p):
        raise SparseflashError(f"{p}: 4096 bytes is too small to measure read sizes")

    monkeypatch.setattr(diskprobe, "probe_file", broken)  # an explicit probe fails loudly, the cache stays
    assert main(["probe", "-m", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small to measure" in err[0]
    assert DeviceModel.from_file(cached) == FAST_DEEP
    assert main(["probe", "-m", str(tmp_path / "missing.sflash")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    _, path = tiny_layout(tmp_path_factory.mktemp("lay"), "nemotron", dtype="f16")
    with LayoutFile.open(path) as f:
        regions = list(f.layers)
    return str(path), regions


def test_the_reader_prices_its_reads_at_its_queue_depth(layout):
    path, regions = layout
    reader = BundleReader(path, regions, FAST_DEEP, threads=8, buffer_bytes=4096)
    try:
        positions = np.arange(0, regions[0].n_neurons, 3)
        dest = np.zeros((len(positions), regions[0].bundle_len), dtype=np.float16)
        result = reader.read(0, positions, dest, np.arange(len(positions)))
    finally:
        reader.close()
    assert result.requests >= 8
    assert result.model_s == pytest.approx(FAST_DEEP.read_time(result.requests, result.bytes, 8))
    assert result.model_s < FAST_DEEP.read_time(result.requests, result.bytes, 1) / 2  # not QD1's price
    assert reader.merge_gap_blocks == min(FAST_DEEP.gap_bytes(8), 4096) // 4096


def test_io_policy_is_planned_unless_given():
    assert io_policy(FAST_DEEP, Budget(nbytes=1 << 40), {"io_threads": 3}) == {"io_threads": 3}
    auto = io_policy(FAST_DEEP, Budget(nbytes=1 << 40), {"window": 2})
    assert (auto["io_threads"], auto["io_buffer_bytes"]) == FAST_DEEP.plan_io(1 << 20, 32 << 20)
    assert auto["window"] == 2
    tight = io_policy(FAST_DEEP, Budget(nbytes=4 << 20), {})  # buffers take at most 1/16 of the budget
    assert tight["io_threads"] * tight["io_buffer_bytes"] <= (4 << 20) // 16
    kept = io_policy(FAST_DEEP, Budget(ffn_share=0.5), {"io_buffer_bytes": 8192})
    assert kept["io_buffer_bytes"] == 8192


def test_io_report_rows_put_achieved_next_to_the_model():
    from sparseflash.eval.io_report import _engine_row
    from sparseflash.eval.render import io_markdown
    from sparseflash.runtime.token_stats import TokenStats

    s = TokenStats(tokens=1, bytes_read=2_000_000, requests=4, hits=1, misses=3, model_read_s=0.001)
    s.read_spans = [(0.0, 0.002)]
    row = _engine_row([s], 1, 4_000_000)
    assert row["achieved_gbps"] == pytest.approx(1.0) and row["device_model_gbps"] == pytest.approx(2.0)
    modes = {m: dict(row, ppl=1.0, top1_agreement=1.0) for m in ("dense-stream", "sparse", "sparse+window", "oracle")}
    del modes["oracle"]["achieved_gbps"]  # a mode measured without the model's figure shows '-'
    report = {"tokens": 1, "budget": "50%ffn", "budget_bytes": 1, "layouts": [
        {"layout": "m.sflash", "order": "coact", "modes": modes, "fetched_vs_oracle": 1.0}]}
    lines = io_markdown(report).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # every row has the header's columns
    assert "| 1.00 (2.00) |" in lines[4] and "| - |" in table[5]


def test_a_model_measured_at_qd1_only_keeps_the_default_plan():
    qd1 = DeviceModel(100e-6, 1e9, "small file", (QueueLevel(1, 100e-6, 1e9),))
    assert qd1.plan_io() == DEFAULT_IO


def test_a_stall_during_one_pass_does_not_bend_a_level(tmp_path, monkeypatch):
    """A fake disk that answers in 1 ms but stalls (40 ms a read) through the first pass over the
    depths: each cell keeps its fastest pass, so every level is the fast disk's."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(8 << 20))
    state = {"stall": False}

    def disk(fd, bufs, offset):
        time.sleep(0.04 if state["stall"] else 0.001)
        return len(bufs[0])

    row = diskprobe._depth_row
    seen = []

    def depth_row(fd, direct, file_bytes, size, depth, seconds, seed):
        seen.append(seed)
        state["stall"] = seed == 0  # the first pass (seed 0 + pass 0) stalls
        return row(fd, direct, file_bytes, size, depth, seconds, seed)

    monkeypatch.setattr(os, "preadv", disk)
    monkeypatch.setattr(diskprobe, "_depth_row", depth_row)
    model, rows = diskprobe.probe_file(path, seconds_per_size=0.01, depths=(2, 4), seconds_per_depth=0.2)
    assert set(seen) == {0, 1} and diskprobe.PASSES == 2
    for r in rows:
        if r["depth"] > 1:
            assert r["median_s"] < 0.01, r  # 1 ms reads shared by the depth, not the stalled 40 ms


def test_plan_io_keeps_two_reads_in_flight_on_a_disk_fastest_at_qd1():
    """The probe's bare reads say one in flight is best, but each piece's check runs after its read:
    the plan keeps a second read going meanwhile, unless only one fits the memory or the depth limit."""
    qd1_best = DeviceModel(80e-6, 2.3e9, "test", (QueueLevel(1, 80e-6, 2.3e9), QueueLevel(2, 35e-6, 1.7e9),
                                                 QueueLevel(4, 29e-6, 2.1e9), QueueLevel(8, 12e-6, 1.4e9)))
    depth, size = qd1_best.plan_io(1 << 20, 32 << 20)
    assert (depth, size) == (4, 1 << 20)  # the best depth >= 2 (QD2 is below 95% of QD4)
    assert qd1_best.plan_io(1 << 20, 4096) == (1, 4096)  # room for one block only
    assert qd1_best.plan_io(1 << 20, 32 << 20, max_depth=1) == (1, 1 << 20)
