"""The fused decode-time predictor (kernels/predictor.py) against its definition and against the torch
path it replaces for a few tokens on the host (runtime/predict.py)."""

import numpy as np
import pytest
import torch

from sparseflash.kernels import predictor as kernel
from sparseflash.layout.schema import predictor_logits
from sparseflash.runtime.predict import FUSED_TOKENS, LayerPredictor


def _weights(d=48, n=200, r=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d, generator=g) * 0.3, torch.randn(r, generator=g) * 0.1,
            torch.randn(n, r, generator=g) * 0.5, torch.randn(n, generator=g) - 1.0)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_top_logits_is_the_highest_logit_over_the_tokens(tokens):
    w = _weights()
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(tokens))
    want = predictor_logits(x, *w).max(dim=0).values.numpy()
    got = kernel.top_logits(x.numpy(), *(t.numpy() for t in w))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_top_logits_keeps_nan():
    w = [t.numpy() for t in _weights()]
    x = np.full((1, 48), np.nan, dtype=np.float32)
    assert np.isnan(kernel.top_logits(x, *w)).all()


def test_select_applies_the_cut_the_offset_and_the_miss_cut():
    top = np.array([0.5, 2.0, -1.0, 1.5, 3.0, 0.9], dtype=np.float32)
    assert kernel.select(top, 1.0).tolist() == [1, 3, 4]
    offset = np.array([1.0, -5.0, 0.0, 0.0, 0.0, 0.2], dtype=np.float32)
    assert kernel.select(top, 1.0, offset).tolist() == [0, 3, 4, 5]
    cached = np.array([True, False, False, False, True, False])
    # not cached: kept only above the miss cut (2.0); the offset does not enter that test
    assert kernel.select(top, 1.0, offset, cached, 2.0).tolist() == [0, 4]
    assert kernel.select(top, 1.0, None, cached, None).tolist() == [1, 3, 4]  # no miss cut: cached unused


def test_select_and_top_logits_refuse_bad_shapes():
    w = [t.numpy() for t in _weights()]
    with pytest.raises(ValueError, match="shapes do not agree"):
        kernel.top_logits(np.zeros((1, 47), np.float32), *w)
    with pytest.raises(ValueError, match="float32"):
        kernel.top_logits(np.zeros((1, 48), np.float64), *w)
    with pytest.raises(ValueError, match="offset"):
        kernel.select(np.zeros(5, np.float32), 0.0, np.zeros(4, np.float32))


def _torch_path(p: LayerPredictor) -> LayerPredictor:
    slow = LayerPredictor(p.w1, p.b1, p.w2, p.b2, p.topk, p.cut, p.miss_cut)
    object.__setattr__(slow, "_host", None)  # the torch path, as for a device predictor
    return slow


@pytest.mark.parametrize("strategy,tokens", [("threshold", 1), ("threshold", 5), ("threshold", FUSED_TOKENS),
                                             ("topk", 1)])
def test_the_fused_path_chooses_what_the_torch_path_chooses(strategy, tokens):
    rng = np.random.default_rng(tokens)
    n = 200
    fast = LayerPredictor(*_weights(n=n), topk=17, cut=0.25, miss_cut=0.9)
    slow = _torch_path(fast)
    assert fast._host is not None
    for trial in range(20):
        x = torch.from_numpy(rng.standard_normal((tokens, 48)).astype(np.float32))
        offset = rng.choice([0.3, -0.4], n).astype(np.float32) if trial % 2 else None
        cached = rng.random(n) < 0.4 if trial % 3 else None
        margin = 0.1 * (trial % 2)
        got, got_top = fast.predict(x, strategy, margin, scores=True, offset=offset, cached=cached)
        want, want_top = slow.predict(x, strategy, margin, scores=True, offset=offset, cached=cached)
        np.testing.assert_allclose(got_top, want_top, rtol=1e-5, atol=1e-5)
        # float32 sums in another order: a logit within 1e-4 of a cut may land on the other side
        z = want_top + (0 if offset is None else offset)
        borderline = (np.abs(z - (fast.cut - margin)) < 1e-4) | (np.abs(want_top - (fast.miss_cut - margin)) < 1e-4)
        differ = np.setxor1d(got, want)
        assert borderline[differ].all(), f"trial {trial}: {differ} chosen by one path only"
        assert got.dtype == np.int64 and np.all(np.diff(got) > 0)


def test_more_tokens_than_the_fused_path_takes_use_torch(monkeypatch):
    p = LayerPredictor(*_weights(), topk=5, cut=0.0)
    calls = []
    monkeypatch.setattr(kernel, "top_logits", lambda *a: calls.append(a) or np.zeros(200, np.float32))
    p.predict(torch.zeros(FUSED_TOKENS + 1, 48), "threshold")
    p.predict(torch.zeros(2, 48), "topk")
    assert calls == []
    p.predict(torch.zeros(1, 48), "topk")
    assert len(calls) == 1
