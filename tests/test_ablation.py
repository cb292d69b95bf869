"""io-report --ablation: every variant measured on the same tokens, next to its own Belady floor and
the oracle."""

from layouts import tiny_layout
from test_cost_aware import _miss_gate
from test_predicted_sets import _predictors

from sparseflash.eval.ablation import VARIANTS, ablation_markdown, fetch_ablation
from sparseflash.runtime.iomodel import DeviceModel


def test_ablation_rows_sit_above_their_belady_floor(tmp_path):
    preds = _predictors(2)
    for p in preds.values():
        p.miss_cuts = (6.0,)  # the layout's validated miss cut (top-k: a picked neuron not in memory must pass it)
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=preds, strategy="topk", n_hot=8,
                          gate=_miss_gate("topk"))
    ids = list(range(5, 69))
    r = fetch_ablation(str(path), ids, tokens=64, ctx=32, budgets=("30%ffn",), quiet=True,
                       device=DeviceModel(latency_s=80e-6, bandwidth_bps=1e9, source="test"))
    b = r["budgets"]["30%ffn"]
    assert list(b["variants"]) == list(VARIANTS)
    for row in b["variants"].values():
        assert row["neurons_fetched_per_token"] >= row["belady_same_trace_fetched"] - 1e-9
        assert row["bytes_per_token"] > 0 and row["ppl"] > 0
        assert abs(row["fetched_vs_oracle"] * b["oracle"]["neurons_fetched_per_token"]
                   - row["neurons_fetched_per_token"]) < 1e-6
    every, cut, _, _, former_rule, _, even, offsets = b["variants"].values()
    assert cut["policy"]["lookahead"] is False and former_rule["policy"]["probation"] is False
    assert cut["neurons_fetched_per_token"] < every["neurons_fetched_per_token"]  # the miss cut bites
    assert offsets["neurons_fetched_per_token"] < every["neurons_fetched_per_token"]  # so does the miss penalty
    assert "| oracle (true active + Belady, simulated) |" in ablation_markdown(r)
    # a runtime that does not know the future fetches at least Belady's count for the same sets
    assert b["oracle"]["online_fetched_per_token"] >= b["oracle"]["neurons_fetched_per_token"] - 1e-9
    assert "| online floor (true active + frequency eviction, window 4, simulated) |" in ablation_markdown(r)
