"""The per-token timeline of the streamed engine (run --stats): each layer's attention, prediction,
I/O wait, compute and bookkeeping, which add up to the step's wall time."""

import time

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.model.transformer import KVCache
from sparseflash.runtime.session import open_streamed
from sparseflash.runtime.token_stats import TokenStats


def random_predictors(layers: int, n: int = 160, d: int = 64, topk: int = 24) -> dict:
    """Own and look-ahead predictors of random weights (they pick varying sets, which is all a
    test of the I/O machinery needs)."""
    from sparseflash.layout.predictor import Predictor

    g = torch.Generator().manual_seed(0)
    make = lambda: Predictor(torch.randn(8, d, generator=g), torch.zeros(8), torch.randn(n, 8, generator=g),  # noqa: E731
                             torch.zeros(n), topk=topk, cut=2.0)
    preds = {f"layer.{l}": make() for l in range(layers)}
    preds.update({f"lookahead.{l}": make() for l in range(1, layers)})
    return preds


@pytest.mark.parametrize("strategy", ["all", "topk", "threshold"])  # threshold: the fused host step
def test_layer_times_add_up_to_the_token_time(tmp_path, strategy):
    dense, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(2), strategy="topk")
    model = open_streamed(path, "30%ffn", strategy=strategy, io_buffer_bytes=4096, lookahead=True)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.layout.config, 12)
    outside = []
    try:
        for i in range(12):
            t = time.perf_counter()
            model.transformer(ids[:, i : i + 1], cache=cache, start=i)
            outside.append(time.perf_counter() - t)
        stats = model.engine.stats
    finally:
        model.close()
    assert len(stats) == 12
    layers = dense.config.num_layers
    for s, wall in zip(stats, outside):
        rows = np.array(s.timeline)
        assert rows.shape == (layers, len(TokenStats.TIMELINE_FIELDS))
        spans = rows[:, :5]  # attention, predict, io wait, compute, bookkeeping
        assert (spans >= 0).all()
        assert spans.sum() + s.head_s == pytest.approx(s.token_s, rel=1e-9, abs=1e-9)
        # the step's own clock agrees with a clock around the call (which adds only call overhead)
        assert s.token_s <= wall
        assert wall - s.token_s <= 0.05 * wall + 2e-3
        # the columns are the totals' parts
        assert rows[:, 2].sum() == pytest.approx(s.io_wait_s, abs=1e-9)
        assert rows[:, 3].sum() == pytest.approx(s.ffn_s, abs=1e-9)
        assert rows[:, 0].sum() == pytest.approx(s.attention_s, abs=1e-9)
        assert rows[:, 5].sum() == s.bytes_read


def test_a_demand_read_on_the_calling_thread_is_io_wait(tmp_path):
    """Reads done inside the caller's thread (small demand reads) count as I/O wait, not bookkeeping."""
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(2), strategy="threshold")
    model = open_streamed(path, "100%ffn", io_buffer_bytes=4096, lookahead=False)  # the misses fit: no batches
    reader = model.engine.fetcher.reader
    if reader.aio is not None:  # the thread path's rule is tested here (an AIO read overlaps the look-ahead)
        reader.aio.close()
        reader.aio = None
    reader._handoff_s = 1.0  # every demand read on this thread
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.layout.config, 8)
    try:
        for i in range(8):
            model.transformer(ids[:, i : i + 1], cache=cache, start=i)
        stats = model.engine.stats
    finally:
        model.close()
    assert sum(s.requests for s in stats) > 0
    for s in stats:  # every read ran inside the step, on this thread: its whole span is waiting
        assert s.io_wait_s >= sum(b - a for a, b in s.read_spans) * (1 - 1e-9)


def test_read_busy_time_is_the_union_of_read_spans():
    s = TokenStats()
    s.read_spans = [(0.0, 1.0), (0.5, 2.0), (3.0, 3.5), (3.1, 3.2)]  # overlapping, nested, apart
    assert s.read_busy_s == pytest.approx(2.5)
    assert TokenStats().read_busy_s == 0.0


def test_run_summary_puts_achieved_bandwidth_next_to_the_device_model(tmp_path):
    from sparseflash.model.generate import Sampling
    from sparseflash.runtime.iomodel import DeviceModel
    from sparseflash.runtime.session import stream_generate

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(2), strategy="topk")
    disk = DeviceModel(latency_s=1e-4, bandwidth_bps=1e9)
    model = open_streamed(path, "30%ffn", io_buffer_bytes=4096, disk=disk)
    try:
        _, summary = stream_generate(model, [1, 2, 3], 8, Sampling(greedy=True), stop_at_eos=False)
    finally:
        model.close()
    assert summary["requests"] > 0 and summary["read_busy_s"] > 0
    assert summary["read_busy_s"] <= summary["step_s"]
    assert summary["achieved_gbps"] == pytest.approx(summary["bytes_read"] / summary["read_busy_s"] / 1e9)
    modelled = summary["requests"] * 1e-4 + summary["bytes_read"] / 1e9
    assert summary["device_model_gbps"] == pytest.approx(summary["bytes_read"] / modelled / 1e9)
    assert summary["mean_request_bytes"] == pytest.approx(summary["bytes_read"] / summary["requests"])
