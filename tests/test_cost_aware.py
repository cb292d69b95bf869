"""Cost-aware selection (a cached neuron costs no read, a missing one costs a read) and eviction by
forecast: the pieces, each checked against its definition."""

import numpy as np
import torch
from layouts import tiny_layout
from test_predicted_sets import _predictors

from sparseflash.model.transformer import KVCache
from sparseflash.runtime.cache import FORECAST_DECAY, NeuronCache
from sparseflash.runtime.predict import LayerPredictor
from sparseflash.runtime.session import open_streamed


def _layer_predictor(n=12, d=6, topk=3, cut=0.0):
    g = torch.Generator().manual_seed(0)
    return LayerPredictor(torch.randn(4, d, generator=g), torch.zeros(4), torch.randn(n, 4, generator=g),
                          torch.zeros(n), topk, cut)


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
        model = open_streamed(path, "40%ffn", io_buffer_bytes=4096, lookahead=False, miss_penalty=penalty)
        try:
            model.engine.trace = [[] for _ in range(2)]
            cache = KVCache(model.layout.config, ids.shape[1])
            for i in range(ids.shape[1]):
                model.transformer(ids[:, i : i + 1], cache=cache, start=i)
            misses = sum(s.misses for s in model.engine.stats)
            computed = np.concatenate([p for layer in model.engine.trace for p in layer])
        finally:
            model.close()
        assert (misses > 0) == reads
        if not reads:
            assert len(computed) and computed.max() < 8  # the hot region only
