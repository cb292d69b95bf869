"""bench/eviction_sweep.py: per layer, the runtime's rule and Belady on the run's and the true traces,
and the grid of rule settings, on a small layout."""

import sys
from pathlib import Path

import numpy as np
from layouts import tiny_layout
from test_cost_aware import _miss_gate
from test_predicted_sets import _predictors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import eviction_sweep as es  # noqa: E402

from sparseflash.layout.schema_cache import EVICTION_DECAY, EVICTION_WINDOW, PROBATION_USES  # noqa: E402


def test_rule_counts_misses_after_the_warm_up(monkeypatch):
    monkeypatch.setattr(es, "WARMUP", 1)
    active = np.zeros((4, 6), dtype=bool)
    active[0, [0, 1]] = active[1, [0, 2]] = active[2, [1, 3]] = active[3, [0, 3]] = True
    # two slots, window 0, no probation: t1 reads 2 (evicts 1, used less recently), t2 reads 1 and 3, t3 reads 0
    assert es.rule(active, 2, 0, 0.99, 0.0) == (1 + 2 + 1) / 3
    assert es.mask([np.array([0, 2, 5])], 2, 6).tolist() == [[False, False, True, False, False, True]]


def test_sweep_sits_above_belady_and_holds_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(es, "WARMUP", 4)
    preds = _predictors(2)
    for p in preds.values():
        p.miss_cuts = (6.0,)
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=preds, strategy="topk", n_hot=8,
                          gate=_miss_gate("topk"))
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = es.sweep(str(path), str(corpus), 64, 32, 0, ["30%ffn"])
    layers = r["budgets"]["30%ffn"]["layers"]
    assert r["tokens"] == 64 and len(layers) == 2
    for x in layers:
        assert x["run_rule"] >= x["run_belady"] - 1e-9 and x["true_rule"] >= x["true_belady"] - 1e-9
        assert len(x["best"]) == 3 and x["best"][0]["fetched"] <= x["run_rule"] + 1e-9  # the default is in the grid
    assert EVICTION_WINDOW in es.GRID["window"] and EVICTION_DECAY in es.GRID["decay"]
    assert PROBATION_USES in es.GRID["probation"]
