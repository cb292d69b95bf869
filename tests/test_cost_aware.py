"""Cost-aware selection (a cached neuron costs no read, a missing one costs a read) and eviction by
forecast: the pieces, each checked against its definition."""

import dataclasses

import numpy as np
import pytest
import torch
from layouts import tiny_layout
from test_predicted_sets import _predictors

from sparseflash.layout.predictor import Predictor, contribution_recall, tune_miss_cut
from sparseflash.model.transformer import KVCache
from sparseflash.runtime.cache import FORECAST_DECAY, NeuronCache
from sparseflash.runtime.predict import LayerPredictor
from sparseflash.runtime.session import open_streamed


def _layer_predictor(n=12, d=6, topk=3, cut=0.0, miss_cut=None, cached_cut=None):
    g = torch.Generator().manual_seed(0)
    return LayerPredictor(torch.randn(4, d, generator=g), torch.zeros(4), torch.randn(n, 4, generator=g),
                          torch.zeros(n), topk, cut, miss_cut, cached_cut)


def test_the_offset_moves_the_choice_but_not_the_scores():
    p = _layer_predictor()
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    z = p.logits(x)[0].numpy()
    offset = np.where(np.arange(12) % 2 == 0, 1.0, -3.0).astype(np.float32)  # even neurons cached
    got, scores = p.predict(x, "threshold", scores=True, offset=offset)
    assert np.array_equal(got, np.nonzero(z + offset > 0.0)[0])
    assert np.allclose(scores, z)  # eviction ranks by the plain logits
    top = p.predict(x, "topk", offset=offset)
    assert np.array_equal(top, np.sort(np.argsort(-(z + offset))[:3]))


def test_forecast_scores_average_the_predicted_probabilities():
    cache = NeuronCache(neurons=4, capacity=4, bundle_len=1, dtype=np.float32, policy="forecast")
    cache.commit(cache.reserve(4), np.arange(4))
    first, second = np.array([0.0, 2.0, -2.0, 0.0]), np.array([0.0, -2.0, 2.0, 4.0])
    cache.note_scores(first)
    cache.note_scores(second)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    want = FORECAST_DECAY * (1 - FORECAST_DECAY) * sig(first) + (1 - FORECAST_DECAY) * sig(second)
    assert np.allclose(cache.score[cache.slot_of[np.arange(4)]], want, atol=1e-6)
    cache.tick()
    cache.step += 10  # every neuron out of the window: the lowest forecast goes first
    assert cache.position_of[cache.evictable()[0]] == int(np.argmin(want))


def test_a_prohibitive_miss_penalty_computes_only_what_is_in_memory(tmp_path):
    """miss_penalty 1e9 (threshold strategy): no neuron outside the hot region is ever read or computed."""
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=_predictors(2), strategy="threshold", n_hot=8)
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(4))
    for penalty, reads in ((0.0, True), (1e9, False)):
        _check_reads(path, ids, reads, lookahead=False, miss_penalty=penalty)


def _check_reads(path, ids, reads: bool, **policy):
    """Decode ``ids`` token by token on a 2-layer layout with 8 hot neurons: reads happen or not as said,
    and without reads only the hot region is computed."""
    model = open_streamed(path, "40%ffn", io_buffer_bytes=4096, **policy)
    try:
        model.engine.trace = [[] for _ in range(2)]
        cache = KVCache(model.layout.config, ids.shape[1])
        for i in range(ids.shape[1]):
            model.transformer(ids[:, i : i + 1], cache=cache, start=i)
        misses = sum(s.misses + s.prefetched for s in model.engine.stats)
        computed = np.concatenate([p for layer in model.engine.trace for p in layer])
        cut = model.engine.predictors.own[1].miss_cut, model.engine.miss_cut_layers()
    finally:
        model.close()
    assert (misses > 0) == reads
    if not reads:
        assert len(computed) and computed.max() < 8  # the hot region only
    return cut  # (layer 1's miss cut, layers that apply it)


def test_the_miss_cut_keeps_the_target_share_of_the_contribution():
    g = torch.Generator().manual_seed(5)
    pred = Predictor(torch.randn(6, 16, generator=g), torch.zeros(6), torch.randn(40, 6, generator=g), torch.zeros(40))
    x = torch.randn(300, 16, generator=g)
    z = pred.logits(x)
    mask = (z + torch.randn(300, 40, generator=g)) > 1.0  # active sets the scores predict, with noise
    mag = torch.rand(300, 40, generator=g) * 5
    for target in (0.99, 0.9, 0.5):
        cut = tune_miss_cut(pred, x, mask, mag, target)
        assert contribution_recall(z > cut, mask, mag) >= target
        # the next active score above the cut is too high: the cut is the largest that keeps the target
        above = z[mask & (z > cut)].min()
        assert contribution_recall(z > above, mask, mag) < target
    assert tune_miss_cut(pred, x, mask, mag, 0.5) > tune_miss_cut(pred, x, mask, mag, 0.9)


def test_the_miss_cut_drops_only_missing_neurons_below_it():
    p = _layer_predictor(cut=-0.5, miss_cut=0.7)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    top = p.logits(x).max(dim=0).values.numpy()
    cached = np.arange(12) % 3 == 0
    plain = p.predict(x, "threshold")
    got = p.predict(x, "threshold", cached=cached)
    assert np.array_equal(got, plain[cached[plain] | (top[plain] > 0.7)])
    assert len(got) < len(plain)  # this draw has missing neurons between the two cuts
    assert np.array_equal(p.predict(x, "threshold"), plain)  # without the cache state, no miss cut
    assert np.array_equal(_layer_predictor(cut=-0.5).predict(x, "threshold", cached=cached), plain)


def test_the_cached_cut_computes_neurons_in_memory_down_to_it():
    """As the engine applies it (an offset of cut - cached_cut on cached neurons, with the miss cut): a
    cached neuron is computed above the cached cut, a missing one is read only above the miss cut."""
    p = _layer_predictor(cut=1.0, miss_cut=1.2, cached_cut=-1.5)
    assert p.cached_bonus == 2.5 and _layer_predictor(cut=0.5).cached_bonus == 0.0
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    top = p.logits(x).max(dim=0).values.numpy()
    cached = np.arange(12) % 3 == 0
    offset = np.where(cached, np.float32(p.cached_bonus), np.float32(0.0))
    for tokens in (x, torch.cat([x] * 20)):  # the fused choice (few tokens) and the torch one (many)
        got = p.predict(tokens, "threshold", offset=offset, cached=cached)
        assert np.array_equal(got, np.nonzero((cached & (top > -1.5)) | (~cached & (top > 1.2)))[0])
    assert (cached & (top > -1.5) & (top <= 1.0)).sum() == 2  # this draw has cached neurons between the two cuts


def test_the_engine_offsets_cached_neurons_only_where_the_miss_cut_applies(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=_predictors(2), strategy="threshold", n_hot=8)
    for use in (True, False):
        model = open_streamed(path, "40%ffn", io_buffer_bytes=4096, miss_cut=use)
        try:
            engine = model.engine
            p = _layer_predictor(n=engine.caches[0].neurons, cut=1.0, miss_cut=2.0, cached_cut=-0.5)
            offset = engine._cost_offset(0, p)
            if use:
                held = engine.caches[0].slot_of >= 0
                assert held.sum() == 8 and np.array_equal(offset, np.where(held, np.float32(1.5), np.float32(0)))
            else:
                assert offset is None
            assert engine._cost_offset(0, _layer_predictor(n=engine.caches[0].neurons, cut=1.0)) is None
        finally:
            model.close()


def _miss_gate(strategy="threshold"):
    return {"strategy": strategy, "own_strategy": strategy, "fallback": False, "max_rise_pct": 1.0,
            "ppl_dense": 20.0, "ppl": {strategy: 20.1}, "rise_pct": {strategy: 0.5},
            "predicted_share": {strategy: 0.1}, "heldout_tokens": 64, "ppl_p": 1.0, "ppl_p_sparsity": 0.9,
            "min_sparsity": 0.5, "too_dense": False, "miss_recalls": [0.9], "miss_rise_pct": {"0.9": 0.8},
            "miss_recall": 0.9}


@pytest.mark.parametrize("validated_share", [0.0, 0.9])
def test_a_layout_miss_cut_above_every_score_reads_nothing_outside_memory(tmp_path, validated_share):
    """The layout records a miss cut no neuron reaches: with it, nothing outside the hot region is read or
    computed; with --no-miss-cut (Policy.miss_cut False), or a cache smaller than the share the cut was
    validated with, the same predictions are read (there the run's predictor has no miss cut at all)."""
    preds = _predictors(2)
    for p in preds.values():
        p.miss_cuts = (1e9,)
    gate = {**_miss_gate(), "miss_share": validated_share}
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=preds, strategy="threshold", n_hot=8, gate=gate)
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(4))
    for use, reads in ((False, True), (True, validated_share > 0.4)):
        cut, layers = _check_reads(path, ids, reads, lookahead=True, miss_cut=use)
        assert cut == (1e9 if validated_share < 0.4 else None) and layers == (2 if use and not reads else 0)


@pytest.mark.parametrize("share, larger, want", [
    (0.3, ((0.5, 4.0),), 2.0),  # the 25% cut: the larger validation needs half the layer in memory
    (0.6, ((0.5, 4.0),), 4.0),  # the stricter cut validated with half the layer
    (1.0, ((0.5, 4.0), (0.75, 6.0)), 6.0),  # the largest validated share the cache holds
    (0.2, ((0.5, 4.0),), None),  # under every validated cache: no miss cut
])
def test_a_run_takes_the_miss_cut_validated_with_the_largest_cache_it_holds(share, larger, want):
    from sparseflash.runtime.predict import Predictors

    p = dataclasses.replace(_layer_predictor(cut=0.0, miss_cut=2.0, cached_cut=-1.0), larger_miss_cuts=larger)
    fitted = Predictors("threshold", {0: p}, {0: p}, 0.25).for_caches(share)
    assert fitted.own[0].miss_cut == want and fitted.lookahead[0].miss_cut == want
    assert fitted.own[0].cached_cut == -1.0 and fitted.miss_share == 0.0
    none_at_base = dataclasses.replace(p, miss_cut=None)  # no cut held the bound with the 25% cache
    assert Predictors("threshold", {0: none_at_base}, {}, 0.25).for_caches(0.6).own[0].miss_cut == 4.0


class _FixedScores:
    """A stand-in predictor whose logits are given (tokens, neurons), for the validation's cache rule."""

    def __init__(self, z, cut):
        self.z, self.cut, self.neurons = torch.tensor(z, dtype=torch.float32), cut, len(z[0])

    def logits(self, x):
        return self.z


@pytest.mark.parametrize("share, cached_cut, kept_n2", [(2 / 3, None, [1, 0, 0, 0]), (1.0, None, [1, 0, 0, 1]),
                                                       (1.0, -0.5, [1, 0, 0, 1]), (1.0, -2.0, [1, 1, 1, 1])])
def test_the_gate_validation_keeps_what_its_cache_holds_and_reads_above_the_miss_cut(share, cached_cut, kept_n2):
    """Worked by hand (cut 0, miss cut 1, one window of 4 tokens, an LRU cache of 2 or 3 neurons):
    neurons 0 and 2 are read at token 0; neuron 1 waits until its logit passes the miss cut at token 2;
    neuron 2, not picked at tokens 1-2, is evicted from a 2-neuron cache by then (neurons 0 and 1 were
    used later), so at token 3 only the 3-neuron cache still holds it. With a cached cut of -2, neuron 2
    (logit -1 at tokens 1-2, in memory) is computed at every token; a cached cut of -0.5 is above -1."""
    from sparseflash.layout.miss_cut import MissRun as _MissRun

    z = [[2, 0.5, 2], [0.5, 0.5, -1], [0.5, 2, -1], [0.5, 0.5, 0.5]]
    run = _MissRun(ctx=4, layers=1, share=share)
    a = torch.ones(4, 3)
    kept = run.hook(_FixedScores(z, 0.0), 1.0, cached_cut)(0, slice(0, 4), torch.zeros(4, 2), a)
    assert kept[:, 0].tolist() == [1, 1, 1, 1] and kept[:, 1].tolist() == [0, 0, 1, 1]
    assert kept[:, 2].tolist() == kept_n2
    assert run.read[0] == 3  # each neuron read once: the first time it is computed
    assert run.computed[0] == kept.sum() and run.tokens[0] == 4


@pytest.mark.parametrize("tokens", [1, 40])  # one token: the fused host choice; 40: the torch path
def test_the_lookahead_raise_lifts_the_cut_and_the_miss_cut_but_not_topk(tokens):
    p = _layer_predictor(n=64, cut=-0.5, miss_cut=0.5)
    x = torch.randn(tokens, 6, generator=torch.Generator().manual_seed(7))
    top = p.logits(x).max(dim=0).values.numpy()
    cached = np.arange(64) % 3 == 0
    for r in (0.0, 0.7, 2.5):
        got = p.predict(x, "threshold", cached=cached, raise_by=r)
        want = np.nonzero((top > -0.5 + r) & (cached | (top > 0.5 + r)))[0]
        assert np.array_equal(got, want), r
    k_only = _layer_predictor(n=64, topk=5)
    one = x[:1]
    assert np.array_equal(k_only.predict(one, "topk", raise_by=3.0), k_only.predict(one, "topk"))


def test_a_high_lookahead_raise_reads_nothing_ahead_and_computes_the_same(tmp_path):
    """Raising the look-ahead's cuts above every logit stops the reads ahead; with the miss cut off the
    neurons computed (and so the logits) are the layer's own prediction either way."""
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=_predictors(2), strategy="threshold", n_hot=8)
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(4))
    runs = {}
    for r in (0.0, 1e6):
        model = open_streamed(path, "40%ffn", io_buffer_bytes=4096, lookahead=True, miss_cut=False, lookahead_raise=r)
        try:
            cache = KVCache(model.layout.config, ids.shape[1])
            logits = torch.cat([model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(ids.shape[1])], 1)
            runs[r] = (logits, sum(s.prefetched for s in model.engine.stats))
        finally:
            model.close()
    assert runs[0.0][1] > 0 and runs[1e6][1] == 0
    assert torch.allclose(runs[0.0][0], runs[1e6][0], atol=1e-5)


def test_a_lookahead_raise_that_is_not_a_number_is_refused():
    from sparseflash.errors import SparseflashError
    from sparseflash.runtime.policy import Budget, Policy

    with pytest.raises(SparseflashError, match="--lookahead-raise"):
        Policy(Budget(ffn_share=0.25), lookahead_raise=float("nan"))
