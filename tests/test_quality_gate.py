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
