"""The fused host decode step (runtime/fused.py, kernels/step.py) chooses, reads and computes what
the engine's step-by-step path does: the same neurons, reads, statistics and outputs."""

import dataclasses

import numpy as np
import pytest
import torch
from layouts import tiny_layout
from test_predicted_sets import _predictors

from sparseflash.kernels import get_backend, step
from sparseflash.kernels import predictor as predictor_kernel
from sparseflash.kernels.bundles import pack_bundles
from sparseflash.kernels.halfbits import kernel_view
from sparseflash.model.transformer import KVCache
from sparseflash.runtime.compute import count_active
from sparseflash.runtime.session import open_streamed


def _decode(path, ids, fused: bool, budget, miss_cut=None, cached_cut=None, **policy):
    """Per token: logits, predicted sets and the statistics, decoding ``ids`` one token at a time."""
    policy.setdefault("lookahead", True)  # the fused look-ahead too
    model = open_streamed(path, budget, io_buffer_bytes=4096, io_threads=2, **policy)
    try:
        engine = model.engine
        assert engine.fused is not None  # a host threshold run of a float layout takes it
        if not fused:
            engine.fused = None
        if miss_cut is not None:  # every layer's own predictor with a miss cut above its cut
            for table in (engine.predictors.own, engine.predictors.lookahead):  # own and look-ahead ones
                for l, p in table.items():  # and, optionally, a cut for cached neurons below it
                    table[l] = dataclasses.replace(
                        p, miss_cut=p.cut + miss_cut, cached_cut=None if cached_cut is None else p.cut + cached_cut)
        engine.trace = [[] for _ in engine.caches]
        cache = KVCache(model.layout.config, ids.shape[1])
        logits = [model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(ids.shape[1])]
        stats = [(s.predicted, s.hits, s.misses, s.prefetched, s.needed, s.bytes_read, tuple(s.per_layer_predicted))
                 for s in engine.stats]
        for c in engine.caches:
            c.check()
        return torch.cat(logits, dim=1), [np.concatenate(t) for t in engine.trace], stats
    finally:
        model.close()


@pytest.mark.parametrize("family,dtype,budget,policy", [
    ("nemotron", "f16", "40%ffn", {}),
    ("nemotron", "f32", "25%ffn", {"eviction": "forecast", "cached_bonus": 0.5, "miss_penalty": 1.0}),
    ("nemotron", "bf16", "40%ffn", {"eviction": "lru", "window": 1, "margin": 0.5}),
    ("llama-silu", "f16", "30%ffn", {"eviction": "predicted", "miss_cut": 0.3}),  # gated, with biases
    ("nemotron", "f16", "40%ffn", {"miss_cut": 0.3, "cached_cut": -1.0}),  # validated cuts both sides
])
def test_fused_and_step_by_step_paths_agree(tmp_path, family, dtype, budget, policy):
    _, path = tiny_layout(tmp_path, family, dtype=dtype, preds=_predictors(2), strategy="threshold", n_hot=8)
    ids = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(4))
    miss_cut, cached_cut = policy.pop("miss_cut", None), policy.pop("cached_cut", None)
    fused, plain = (_decode(path, ids, f, budget, miss_cut, cached_cut, **policy) for f in (True, False))
    assert [np.array_equal(a, b) for a, b in zip(fused[1], plain[1])] == [True, True]  # the same neurons
    assert fused[2] == plain[2]  # the same hits, misses, reads and truly active counts, token by token
    assert sum(s[2] for s in fused[2]) > 0  # misses were read
    assert sum(s[3] for s in fused[2]) > 0  # and look-ahead reads started
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    if cached_cut is not None:  # the lower cut computes more cached neurons, and reads no more
        # (without probation: a neuron the lower cut computes leaves probation, which moves victims on these
        # random predictors by more than the cut itself does)
        lower, base = (_decode(path, ids, True, budget, miss_cut, c, probation=False, **policy) for c in (cached_cut, None))
        assert sum(s[0] for s in lower[2]) > sum(s[0] for s in base[2])
        assert lower[2][0][2] == base[2][0][2]  # the same cache at the first token: the same misses
        # later the caches differ (other neurons touched, so other victims): the misses stay within 1%
        assert sum(s[2] for s in lower[2]) <= 1.01 * sum(s[2] for s in base[2])


def test_fused_step_with_misses_beyond_the_cache_goes_through_batches(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), strategy="threshold", n_hot=8)
    probe = open_streamed(path, 1 << 40, io_buffer_bytes=4096, io_threads=2, lookahead=True)  # as _decode runs
    minimum = probe.engine.memory.minimum
    probe.close()
    small = open_streamed(path, minimum, io_buffer_bytes=4096, io_threads=2, lookahead=True)
    slots = small.engine.caches[0].capacity  # hot region + the fewest slots a layer may have
    small.close()
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(5))
    fused, plain = (_decode(path, ids, f, minimum, margin=3.0) for f in (True, False))  # wide sets, few slots
    assert max(max(s[6]) for s in fused[2]) > slots  # a layer's set larger than its whole cache
    assert fused[2] == plain[2]
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("storage", ["f32", "f16", "bf16"])
def test_step_kernel_is_the_predictor_choice_then_the_sparse_ffn_of_the_cached_ones(storage):
    rng = np.random.default_rng(0)
    d, n, r, slots = 32, 96, 8, 40
    w1, b1 = rng.standard_normal((r, d), dtype=np.float32), rng.standard_normal(r, dtype=np.float32)
    w2, b2 = rng.standard_normal((n, r), dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    x = rng.standard_normal((1, d), dtype=np.float32)
    w_up = rng.standard_normal((slots, d), dtype=np.float32) * 0.2
    w_down = rng.standard_normal((d, slots), dtype=np.float32) * 0.2
    bundles = pack_bundles(w_up, w_down, None, storage)  # slot i holds stored position held[i]
    held = rng.choice(n, slots, replace=False)
    slot_of = np.full(n, -1, dtype=np.int64)
    slot_of[held] = np.arange(slots)
    up_bias = rng.standard_normal(slots, dtype=np.float32)
    norms = rng.uniform(0.0, 0.5, n).astype(np.float32)  # down-column norms by stored position
    top_ref = predictor_kernel.top_logits(x, w1, b1, w2, b2)
    for offset, miss_cut in ((None, None), ((0.5, 2.0), None), (None, 3.0), ((1.0, 0.5), 2.5)):
        y = np.empty((1, d), dtype=np.float32)
        top, positions, hit_slots, missing, acts, active = step.select_and_run_hits(
            x, w1, b1, w2, b2, 1.0, slot_of, kernel_view(bundles, storage), 0, False, np.zeros(0, np.float32),
            up_bias, y, offset=offset, miss_cut=miss_cut, norms=norms, threshold=0.05)
        cached = slot_of >= 0
        off = None if offset is None else np.where(cached, offset[0], -offset[1]).astype(np.float32)
        want = predictor_kernel.select(top_ref, 1.0, off, cached if miss_cut is not None else None, miss_cut)
        np.testing.assert_array_equal(top, top_ref)
        np.testing.assert_array_equal(positions, want)
        np.testing.assert_array_equal(hit_slots, slot_of[want[cached[want]]])
        np.testing.assert_array_equal(missing, want[~cached[want]])
        y_ref = get_backend("cpu").sparse_ffn(x, bundles, hit_slots, "relu2", storage=storage, up_bias=up_bias)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        assert acts.shape == (1, len(hit_slots))
        held_norms = norms[positions[cached[positions]]]
        assert active == count_active(acts, held_norms, 0.05) and 0 < active < len(hit_slots)
        # the misses' kernel adds their output to y (here: slots standing for the missing positions)
        extra = rng.choice(slots, 12, replace=False).astype(np.int64)
        extra_pos = held[extra].astype(np.int64)
        before = y.copy()
        added = step.run_and_add(x, kernel_view(bundles, storage), extra, extra_pos, 0, False, np.zeros(0, np.float32),
                                 up_bias, y, norms=norms, threshold=0.05)
        acts_ref = np.empty((1, len(extra)), dtype=np.float32)
        part = get_backend("cpu").sparse_ffn(x, bundles, extra, "relu2", storage=storage, up_bias=up_bias,
                                             activations_out=acts_ref)
        np.testing.assert_allclose(y, before + part, rtol=1e-5, atol=1e-5)
        assert added == count_active(acts_ref, norms[extra_pos], 0.05) and added > 0


def test_step_kernel_refuses_shapes_that_do_not_agree():
    w1, w2 = np.ones((2, 4), np.float32), np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="do not agree"):
        step.select_and_run_hits(np.ones((2, 4), np.float32), w1, np.zeros(2, np.float32), w2,
                                 np.zeros(8, np.float32), 0.0, np.full(8, -1, np.int64), np.zeros((1, 8), np.float32),
                                 0, False, np.zeros(0, np.float32), np.zeros(0, np.float32),
                                 np.zeros((2, 4), np.float32))
