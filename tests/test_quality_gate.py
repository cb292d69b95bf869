"""prepare's quality gate: the predicted mode is kept only within the perplexity bound; otherwise the
other strategy, otherwise exact streaming; a model too dense to gain is reported with its numbers."""

from sparseflash.layout.quality_gate import decide_gate, gate_line


def _report(dense=20.0, topk=20.1, threshold=20.5, own="topk"):
    return {"ppl": {"dense": dense, "oracle": dense * 1.01, "predicted_topk": topk, "predicted_threshold": threshold,
                    "predicted": min(topk, threshold)},
            "strategy": own, "mean": {"sparsity_topk": 0.9, "sparsity_threshold": 0.8}, "val_tokens": 1024}


PROFILE = {"ppl_p": 1.0, "ppl_p_sparsity": 0.9}


def test_the_predictors_own_choice_is_kept_within_the_bound():
    gate = decide_gate(_report(), PROFILE, max_rise_pct=1.0, min_sparsity=0.5)
    assert gate["strategy"] == "topk" and not gate["fallback"] and not gate["too_dense"]
    assert abs(gate["rise_pct"]["topk"] - 0.5) < 1e-9
    assert gate["predicted_share"]["topk"] == 1 - 0.9
    assert "kept topk" in gate_line(gate) and "+0.50%" in gate_line(gate)


def test_a_missed_bound_falls_back_to_the_other_strategy_then_to_exact_streaming():
    gate = decide_gate(_report(topk=20.5, threshold=20.1), PROFILE, max_rise_pct=1.0, min_sparsity=0.5)
    assert gate["strategy"] == "threshold" and gate["fallback"]
    gate = decide_gate(_report(topk=25.0, threshold=2304.0), PROFILE, max_rise_pct=1.0, min_sparsity=0.5)
    assert gate["strategy"] == "all" and gate["fallback"]
    line = gate_line(gate)
    assert "FALLBACK to all" in line and "+25.00%" in line and "bound +1%" in line


def test_a_model_too_dense_to_gain_is_reported_with_its_numbers():
    gate = decide_gate(_report(), {"ppl_p": 1.0, "ppl_p_sparsity": 0.031}, max_rise_pct=1.0, min_sparsity=0.5)
    assert gate["too_dense"]
    assert "too dense to gain: PPL-1% sparsity 3.1% < 50%" in gate_line(gate)


def _with_miss(rises, own="threshold", topk=20.5, threshold=20.1):
    report = _report(topk=topk, threshold=threshold, own=own)
    report["miss_share"] = 0.25
    report["miss"] = [{"recall": r, "ppl": 20.0 * (1 + rise / 100), "predicted_share": 0.05, "recall_active": 0.9}
                      for r, rise in rises]
    return report


def test_the_sparsest_miss_cut_within_the_bound_is_kept():
    gate = decide_gate(_with_miss([(0.95, 0.4), (0.9, 0.9), (0.8, 3.0)]), PROFILE, 1.0, 0.5)
    assert gate["strategy"] == "threshold" and gate["miss_recall"] == 0.9 and gate["miss_share"] == 0.25
    assert gate["miss_recalls"] == [0.95, 0.9, 0.8] and abs(gate["miss_rise_pct"]["0.8"] - 3.0) < 1e-9
    assert "read only above the cut keeping 0.9 of the active contribution (+0.90% with 25% of the FFN neurons in memory" in gate_line(gate)
    larger = {**_with_miss([(0.95, 0.4), (0.9, 1.2)]), "miss_larger": [
        {"share": 0.5, "miss": [{"recall": 0.95, "ppl": 20.04}, {"recall": 0.9, "ppl": 20.16}]}]}
    gate = decide_gate(larger, PROFILE, 1.0, 0.5)  # 0.9 misses with 25% in memory, holds with 50%
    assert gate["miss_recall"] == 0.95 and gate["miss_larger"][0]["miss_recall"] == 0.9
    assert "with 50% of the FFN neurons in memory: the cut keeping 0.9 (+0.80%)" in gate_line(gate)
    cached = decide_gate({**_with_miss([(0.9, 0.9)]), "cached_share": 0.9995}, PROFILE, 1.0, 0.5)
    assert cached["cached_share"] == 0.9995 and "computed down to the cut keeping 0.9995 (+0.90%" in gate_line(cached)


def test_no_miss_cut_when_none_holds_the_bound_or_the_strategy_is_not_threshold():
    gate = decide_gate(_with_miss([(0.95, 1.5), (0.9, 2.0)]), PROFILE, 1.0, 0.5)
    assert gate["miss_recall"] is None and "no miss cut within the bound" in gate_line(gate)
    gate = decide_gate(_with_miss([(0.95, 0.1)], own="topk", topk=20.1, threshold=20.5), PROFILE, 1.0, 0.5)
    assert gate["strategy"] == "topk" and gate["miss_recall"] is None  # the cuts were measured for threshold only
    assert decide_gate(_report(), PROFILE, 1.0, 0.5)["miss_recall"] is None  # a report from before miss cuts


def test_the_threshold_strategy_comes_first_where_its_miss_cuts_were_validated():
    """Top-k has the lower perplexity here, but the threshold strategy is within the bound and only it has
    validated miss cuts (which read far less): it is kept, not as a fallback. Over the bound, top-k."""
    gate = decide_gate(_with_miss([(0.95, 0.8)], own="topk", topk=20.05, threshold=20.1), PROFILE, 1.0, 0.5)
    assert gate["strategy"] == "threshold" and not gate["fallback"] and gate["miss_recall"] == 0.95
    assert "kept threshold" in gate_line(gate)
    gate = decide_gate(_with_miss([(0.95, 0.8)], own="topk", topk=20.05, threshold=20.3), PROFILE, 1.0, 0.5)
    assert gate["strategy"] == "topk" and gate["fallback"] and gate["miss_recall"] is None


def test_a_miss_cut_must_hold_the_bound_one_standard_error_above_its_measured_rise():
    """0.9 is +0.8% over the whole text but +1.3% one standard error above: not kept; 0.95 holds there."""
    report = _with_miss([(0.95, 0.5), (0.9, 0.8)])
    report["miss"][0]["rise_upper_pct"] = 0.6
    report["miss"][1]["rise_upper_pct"] = 1.3
    gate = decide_gate(report, PROFILE, 1.0, 0.5)
    assert gate["miss_recall"] == 0.95 and gate["miss_rise_pct"] == {"0.95": 0.6, "0.9": 1.3}  # the upper rise recorded
    for m in report["miss"]:  # a report from before: the measured rise
        del m["rise_upper_pct"]
    assert decide_gate(report, PROFILE, 1.0, 0.5)["miss_recall"] == 0.9


def test_the_upper_rise_is_the_mean_window_difference_plus_its_standard_error():
    import math

    import numpy as np

    from sparseflash.layout.miss_mix import rise_upper

    dense = np.array([300.0, 330.0, 270.0, 310.0])  # summed NLL of 4 windows of 11 tokens (ctx 11)
    diffs = np.array([0.1, 0.3, -0.1, 0.5])  # per-window summed NLL differences
    d = diffs / 10
    want = 100 * (math.exp(d.mean() + d.std(ddof=1) / 2) - 1)
    assert abs(rise_upper(dense + diffs, dense, 11) - want) < 1e-12
    assert abs(rise_upper(dense + 0.2, dense, 11) - 100 * (math.exp(0.02) - 1)) < 1e-12  # no spread: the rise itself
