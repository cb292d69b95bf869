"""What the streamed run's statistics measure: ``attention_s`` is attention only, and the ``needed``
count (truly active among the computed neurons) is optional, off by default on the GPU."""

import time

import numpy as np
import pytest
import torch
from layouts import tiny_layout
from test_runtime_timeline import random_predictors

from sparseflash.model.transformer import KVCache
from sparseflash.runtime.policy import Budget, Policy
from sparseflash.runtime.session import open_streamed


def _decode(model, ids):
    cache = KVCache(model.layout.config, ids.shape[1])
    return torch.cat([model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(ids.shape[1])], 1)


def test_attention_time_leaves_out_the_norms(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(2), strategy="topk")
    model = open_streamed(path, "40%ffn", io_buffer_bytes=4096)
    norm = model.transformer.norm
    pause = 0.2  # far above a tiny model's attention, even its first (warm-up) call on a loaded machine

    def slow_norm(*args):  # a norm that takes 200 ms: time between FFN calls that is not attention
        time.sleep(pause)
        return norm(*args) if args else None

    model.transformer.norm = slow_norm
    native_norm = model.transformer._native.norm  # the one-token steps' norms (model/decode_native.py)
    model.transformer._native.norm = lambda *args: slow_norm() or native_norm(*args)
    try:
        _decode(model, torch.arange(4)[None])
        stats = model.engine.stats
    finally:
        model.close()
    for s in stats:
        rows = np.array(s.timeline)
        assert s.attention_s < pause  # two attention calls of a tiny model, far below one slow norm
        assert rows[:, 4].sum() >= 3 * pause  # layer 0: its two norms; layer 1: two more (other_s)
        assert rows[:, :5].sum() + s.head_s == pytest.approx(s.token_s, rel=1e-9, abs=1e-9)


def test_needed_count_is_optional_and_changes_nothing_else(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=random_predictors(2), strategy="topk")
    ids = torch.arange(6)[None]
    outs, needed = [], []
    for count in (True, False):
        model = open_streamed(path, "40%ffn", io_buffer_bytes=4096, count_needed=count)
        try:
            outs.append(_decode(model, ids))
            needed.append([s.needed for s in model.engine.stats])
        finally:
            model.close()
    assert torch.equal(outs[0], outs[1])
    assert all(isinstance(n, int) and n > 0 for n in needed[0])
    assert needed[1] == [None] * len(ids[0])
    # the default: counted on the host, not on cuda (it would wait for the GPU at every layer)
    assert Policy(Budget(nbytes=1)).counts_needed and not Policy(Budget(nbytes=1), device="cuda").counts_needed


@pytest.mark.parametrize("count", [True, False])
def test_down_norms_are_widened_once_per_neuron_and_only_when_counting(tmp_path, monkeypatch, count):
    from sparseflash.runtime import fetcher

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(2), strategy="topk")
    widened = []
    real = fetcher.down_columns

    def counted(rows, d_model, storage):
        widened.append(len(rows))
        return real(rows, d_model, storage)

    monkeypatch.setattr(fetcher, "down_columns", counted)
    model = open_streamed(path, "25%ffn", io_buffer_bytes=4096, count_needed=count)
    try:
        _decode(model, torch.arange(8)[None])
        engine = model.engine
        reads = sum(s.misses for s in engine.stats)  # bundles read while decoding (the hot region before)
        if not count:
            assert widened == [] and engine.fetcher.norms is None
            return
        seen = sum(int((~np.isnan(k)).sum()) for k in engine.fetcher.norms.known)
        assert sum(widened) == seen < reads + sum(r.n_hot for r in engine.regions)  # bundles read again (a small cache) are not widened again
        d = model.layout.config.hidden_size
        for l, cache in enumerate(engine.caches):
            held = np.nonzero(cache.position_of >= 0)[0]
            truth = np.linalg.norm(real(cache.slots[held], d, engine.regions[l].dtype), axis=1)
            np.testing.assert_allclose(engine.fetcher.norms.of(l, cache.position_of[held]), truth, rtol=1e-6)
    finally:
        model.close()
