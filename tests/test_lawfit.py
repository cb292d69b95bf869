"""The Sparsing Law fits recover known laws from synthetic series, with honest error bars."""

import numpy as np
import pytest

from sparseflash.errors import SparseflashError
from sparseflash.eval.lawfit import LawFit, fit_hinge, fit_law, logspace_law, power_law

TOKENS = np.geomspace(4e4, 3e6, 12)  # a series like bench/train_series.py's; D in millions


def _series(form, truth, noise, seed=0):
    law = logspace_law if form == "logspace" else power_law
    rng = np.random.default_rng(seed)
    return law(TOKENS / 1e6, *truth) + rng.normal(0, noise, len(TOKENS))


@pytest.mark.parametrize("form, truth", [
    ("logspace", (1.0, 0.5, -1.0, 0.10)),  # ReLU-like: decreasing to A0 = 0.10
    ("power", (0.05, 0.5, 0.40)),  # SiLU-like: increasing to A0 = 0.40
])
def test_noiseless_series_is_recovered_exactly(form, truth):
    fit = fit_law(TOKENS, _series(form, truth, 0.0), form)
    assert fit.tokens_unit == 1e6
    np.testing.assert_allclose(list(fit.params.values()), truth, rtol=1e-5, atol=1e-7)
    assert fit.r2 > 1 - 1e-9


@pytest.mark.parametrize("form, truth", [
    ("logspace", (1.0, 0.5, -1.0, 0.10)),
    ("power", (0.05, 0.5, 0.40)),
])
def test_noisy_series_recovers_parameters_within_their_errors(form, truth):
    fit = fit_law(TOKENS, _series(form, truth, 5e-4, seed=1), form)
    for (name, value), true in zip(fit.params.items(), truth):
        err = fit.stderr[name]
        assert err is not None and err > 0, name
        assert abs(value - true) < 4 * err, (name, value, true, err)
    assert abs(fit.limit_ratio - truth[-1]) < 0.02
    assert fit.r2 > 0.99


def test_reported_error_of_the_limit_ratio_matches_its_scatter():
    truth = (0.05, 0.5, 0.40)
    fits = [fit_law(TOKENS, _series("power", truth, 1e-3, seed=s), "power") for s in range(40)]
    scatter = np.std([f.limit_ratio for f in fits])
    reported = np.median([f.limit()[1] for f in fits])
    assert all(f.limit()[1] == f.stderr["A0"] for f in fits)  # alpha > 0: the limit is A0 itself
    assert 0.5 < reported / scatter < 2.0, (reported, scatter)


def test_the_two_forms_tell_decreasing_from_increasing_series():
    relu = fit_law(TOKENS, _series("logspace", (1.0, 0.5, -1.0, 0.10), 5e-4), "logspace")
    silu = fit_law(TOKENS, _series("power", (0.05, 0.5, 0.40), 5e-4), "power")
    assert relu.predict(TOKENS[-1]) < relu.predict(TOKENS[0]) and relu.limit_ratio < relu.predict(TOKENS[-1])
    assert silu.predict(TOKENS[-1]) > silu.predict(TOKENS[0]) and silu.limit_ratio > silu.predict(TOKENS[-1])


def test_hinge_finds_the_bottleneck():
    x = np.array([4.0, 8, 16, 32, 64, 128, 256])
    y = np.where(x < 100, 0.30 + 0.002 * (x - 100), 0.30 - 0.0005 * (x - 100))
    y = y + np.random.default_rng(0).normal(0, 5e-4, len(x))
    fit = fit_hinge(x, y)
    assert 64 <= fit.breakpoint <= 128
    assert fit.params["slope_below"] == pytest.approx(0.002, rel=0.1)
    assert fit.params["slope_above"] == pytest.approx(-0.0005, rel=0.2)
    assert fit.r2 > 0.99
    assert fit.predict([fit.breakpoint])[0] == pytest.approx(fit.params["ratio_at_breakpoint"])


@pytest.mark.parametrize("form, points", [("logspace", 4), ("power", 3), ("hinge", 4)])
def test_series_too_short_for_the_form_is_refused(form, points):
    x, y = np.geomspace(1e5, 1e6, points), np.linspace(0.2, 0.1, points)
    with pytest.raises(SparseflashError, match=f"at least {points + 1}"):
        fit_hinge(x, y) if form == "hinge" else fit_law(x, y, form)


def test_logspace_fit_of_a_plain_power_decay_says_so():
    """Without curvature in log space the logspace law slides to alpha -> 0 (a power law); the fit says so."""
    y = 0.05 + 0.003 * (TOKENS / 1e6) ** -1.2 + np.random.default_rng(0).normal(0, 3e-4, len(TOKENS))
    fit = fit_law(TOKENS, y, "logspace")
    assert fit.note is not None and "power law" in fit.note
    assert abs(fit.params["c"] * fit.params["alpha"] - 1.2) < 0.2
    assert fit.limit_ratio == pytest.approx(fit_law(TOKENS, y, "power").limit_ratio, abs=2e-3)
    assert fit_law(TOKENS, _series("logspace", (1.0, 0.5, -1.0, 0.10), 5e-4), "logspace").note is None


def test_limit_is_where_the_law_goes():
    """A0 when the law converges to it; exp(b) + A0 for a logspace law with alpha < 0; None if it diverges."""
    def law(form, **params):
        k = len(params)
        return LawFit(form, params, dict.fromkeys(params, 0.1), 1e6, 0.9, 0.01, 12, np.eye(k).tolist())

    assert law("power", c=0.1, alpha=0.5, A0=0.4).limit() == (0.4, 1.0)
    assert law("power", c=0.1, alpha=-0.5, A0=0.4).limit() == (None, None)
    assert law("logspace", c=1.0, alpha=0.5, b=-1.0, A0=0.1).limit() == (0.1, 1.0)
    assert law("logspace", c=-1.0, alpha=0.5, b=-1.0, A0=0.1).limit() == (None, None)
    value, err = law("logspace", c=1.0, alpha=-0.5, b=-1.0, A0=0.1).limit()
    assert value == pytest.approx(np.exp(-1.0) + 0.1) and err == pytest.approx(np.sqrt(np.exp(-2.0) + 1.0))
    big = np.array([1e6, 1e20])  # tokens; D = 1 and 1e14
    assert law("logspace", c=1.0, alpha=-0.5, b=-1.0, A0=0.1).predict(big)[-1] == pytest.approx(value, rel=1e-3)
