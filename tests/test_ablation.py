"""io-report --ablation: every variant measured on the same tokens, next to its own Belady floor and
the oracle."""

from layouts import tiny_layout
from test_predicted_sets import _predictors

from sparseflash.eval.ablation import VARIANTS, ablation_markdown, fetch_ablation
from sparseflash.runtime.iomodel import DeviceModel


def test_ablation_rows_sit_above_their_belady_floor(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), strategy="topk", n_hot=8)
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
    today, cost = list(b["variants"].values())[::2][:2]
    assert cost["neurons_fetched_per_token"] < today["neurons_fetched_per_token"]  # the miss penalty bites
    assert "| oracle (true active + Belady, simulated) |" in ablation_markdown(r)
