"""Per-layer miss cuts (layout/miss_mix.py): the lost contribution against its definition, the
allocation against brute force, the fit, the gate's choice, and the layout's per-layer cuts."""

import itertools

import numpy as np
import pytest
import torch

from sparseflash.layout.miss_cut import MissRun
from sparseflash.layout.miss_mix import allocate, plan_mixes, probe_windows
from sparseflash.layout.quality_gate import decide_gate, gate_line


class _FixedScores:
    def __init__(self, z, cut):
        self.z, self.cut, self.neurons = torch.tensor(z, dtype=torch.float32), cut, len(z[0])

    def logits(self, x):
        return self.z


def test_the_lost_contribution_follows_its_definition():
    """Worked by hand (the cache rule of test_cost_aware's validation test, a 2-neuron cache): kept is
    [[1,0,1],[1,0,0],[1,1,0],[1,1,0]], the threshold strategy (logit > 0) computes
    [[1,1,1],[1,1,0],[1,1,0],[1,1,1]]; contributions |a| x norm with norms (1, 2, 3)."""
    z = [[2, 0.5, 2], [0.5, 0.5, -1], [0.5, 2, -1], [0.5, 0.5, 0.5]]
    a = torch.tensor([[1.0, -1, 2], [2, 1, 1], [1, 1, -1], [1, 2, 1]])
    run = MissRun(ctx=4, layers=1, share=2 / 3)
    kept = run.hook(_FixedScores(z, 0.0), 1.0, None, torch.tensor([1.0, 2, 3]))(0, slice(0, 4), torch.zeros(4, 2), a)
    assert (kept != 0).int().tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    c = a.abs() * torch.tensor([1.0, 2, 3])
    total = float(c.sum())  # 42
    plain = total - float(c[1, 2] + c[2, 2])  # the threshold strategy drops (1, 2) and (2, 2)
    computed = float(c[0, 0] + c[0, 2] + c[1, 0] + c[2, 0] + c[2, 1] + c[3, 0] + c[3, 1])
    assert run.contribution[0].tolist() == pytest.approx([total, plain, computed])
    assert run.lost()[0] == pytest.approx((plain - computed) / total)
    assert run.lost_total()[0] == pytest.approx(1 - computed / total)
    assert run.reads().tolist() == pytest.approx([run.read[0] / 4])


def test_the_allocation_reads_least_among_choices_that_cost_no_more():
    """The Lagrangian choice: within the budget, and no per-layer choice costing no more reads fewer
    (brute force over every choice of small random instances); None when nothing fits."""
    reads = np.array([[10, 8, 5], [10, 9, 8.0]])
    cost = np.array([[0, 1, 3], [0, 0.2, 0.5]])
    assert allocate(reads, cost, 1.5) == [1, 2] and allocate(reads, cost, 0.0) == [0, 0]
    assert allocate(reads, cost, 10) == [2, 2] and allocate(reads, cost + 1, 1.0) is None
    rng = np.random.default_rng(0)
    for _ in range(40):
        layers, cands = rng.integers(2, 5), rng.integers(2, 5)
        reads = -np.sort(-rng.uniform(0, 10, (layers, cands)), axis=1)  # steeper candidates read less
        cost = np.sort(rng.uniform(0, 1, (layers, cands)), axis=1)  # and cost more
        budget = rng.uniform(cost[:, 0].sum(), cost[:, -1].sum())
        pick = allocate(reads, cost, budget)
        at = lambda m, p: m[np.arange(len(p)), list(p)].sum()  # noqa: E731
        assert at(cost, pick) <= budget + 1e-9
        for other in itertools.product(range(cands), repeat=layers):
            if at(cost, other) <= at(cost, pick) + 1e-12:
                assert at(reads, other) >= at(reads, pick) - 1e-9


def _run(reads: list[float], lost: list[float]) -> MissRun:
    run = MissRun(ctx=4, layers=len(reads), share=0.25)
    run.read[:], run.tokens[:] = reads, 1.0
    run.contribution[:, 0], run.contribution[:, 2] = 1.0, 1.0 - np.asarray(lost)
    return run


def test_the_mixes_spend_the_room_on_the_layer_that_costs_least():
    """Two layers, three uniform candidates; layer 0 is ten times as sensitive as layer 1. The fit
    recovers rises that are exactly linear in sensitivity x lost contribution, and a mix within the
    bound puts layer 1 at the steepest candidate and keeps layer 0 gentle."""
    runs = [_run([10, 10], [0.00, 0.00]), _run([8, 8], [0.05, 0.05]), _run([6, 6], [0.10, 0.10])]
    sens = [10.0, 1.0]
    rises = [0.2 + 2 * sum(s * lo for s, lo in zip(sens, lost)) for lost in ([0, 0], [.05, .05], [.1, .1])]
    plan = plan_mixes(runs, rises, 0.2, sens, bound=1.0, targets=(1.0, 0.5))
    assert plan["kappa"] == pytest.approx(2.0) and plan["intercept_pct"] == pytest.approx(0.2)
    assert rises == pytest.approx([0.2, 1.3, 2.4])  # the uniform steps: only the gentlest holds +1%
    first = plan["mixes"][0]
    assert first["indices"] == [0, 2] and first["predicted_rise_pct"] == pytest.approx(0.2 + 2 * 0.1)
    assert [m["target"] for m in plan["mixes"]] == [1.0]  # the half-room target gives the same mix: dropped
    assert np.array(plan["reads"]).tolist() == [[10, 8, 6], [10, 8, 6]]


def test_the_probe_windows_fit_their_budget():
    assert probe_windows(16, 6, 3.0).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15]  # 13 = 3 x 16 x 2 / 7
    assert len(probe_windows(16, 32, 3.0)) == 2 and len(probe_windows(16, 3, 3.0)) == 16
    assert len(probe_windows(16, 6, 0.0)) == 0 and len(probe_windows(1, 80, 0.1)) == 1


def _report(mixes, uniform_reads=(50.0, 40.0)):
    dense = 20.0
    ppl = lambda rise: dense * (1 + rise / 100)  # noqa: E731
    return {"ppl": {"dense": dense, "oracle": ppl(1.0), "predicted_topk": ppl(3.0), "predicted_threshold": ppl(0.4),
                    "predicted": ppl(0.4)},
            "strategy": "threshold", "mean": {"sparsity_topk": 0.9, "sparsity_threshold": 0.8}, "val_tokens": 1024,
            "miss_share": 0.25,
            "miss": [{"recall": 0.99, "ppl": ppl(0.6), "read_per_token": uniform_reads[0]},
                     {"recall": 0.95, "ppl": ppl(1.4), "read_per_token": uniform_reads[1]}],
            "miss_larger": [{"share": 0.5, "miss": [{"recall": 0.99, "ppl": ppl(0.5), "read_per_token": 20.0},
                                                    {"recall": 0.95, "ppl": ppl(0.9), "read_per_token": 15.0}]}],
            "miss_mixes": [{"share": 0.25, "mixes": [{"recalls": r, "ppl": ppl(rise), "read_per_token": n}
                                                     for r, rise, n in mixes]},
                           {"share": 0.5, "mixes": [{"recalls": [0.95, 0.99], "ppl": ppl(0.8), "read_per_token": 14.0}]}]}


def test_the_gate_keeps_a_mix_only_within_the_bound_and_when_it_reads_less():
    profile = {"ppl_p": 1.0, "ppl_p_sparsity": 0.9}
    gate = decide_gate(_report([([0.99, 0.95], 0.9, 45.0), ([0.95, 0.95], 0.8, 44.0), ([0.95, 0.99], 1.2, 30.0)]),
                       profile, 1.0, 0.5)
    assert gate["miss_recall"] == 0.99 and gate["miss_layer_recalls"] == [0.95, 0.95]  # fewest reads within +1%
    assert gate["miss_layer_rise_pct"] == pytest.approx(0.8)
    assert gate["miss_larger"][0]["miss_recall"] == 0.95 and gate["miss_larger"][0]["miss_layer_recalls"] == [0.95, 0.99]
    line = gate_line(gate)
    assert "its layer's cut, keeping 0.95/0.95 of the active contribution (+0.80% with 25%" in line
    assert "with 50% of the FFN neurons in memory: per-layer cuts keeping 0.95/0.99 (+0.80%)" in line
    gate = decide_gate(_report([([0.99, 0.95], 0.9, 55.0)]), profile, 1.0, 0.5)  # reads more than the uniform cut
    assert gate["miss_layer_recalls"] is None and "keeping 0.99 of the active" in gate_line(gate)
    gate = decide_gate(_report([([0.99, 0.95], 0.9, 45.0)], uniform_reads=(50.0, 40.0)), profile, 0.5, 0.5)
    assert gate["miss_recall"] is None and gate["miss_layer_recalls"] is None  # nothing within +0.5%


def test_a_layout_takes_each_layers_cut_from_the_gates_per_layer_choice(tmp_path):
    from layouts import tiny_layout
    from test_cost_aware import _miss_gate
    from test_predicted_sets import _predictors

    from sparseflash.errors import SparseflashError
    from sparseflash.runtime.layout_model import open_layout

    preds = _predictors(2)
    for l, p in enumerate(preds.values()):
        p.miss_cuts = (1.0 + l, 5.0 + l)
    gate = {**_miss_gate(), "miss_recalls": [0.99, 0.9], "miss_rise_pct": {"0.99": 0.5, "0.9": 1.5},
            "miss_recall": 0.99, "miss_share": 0.25, "miss_layer_recalls": [0.9, 0.99], "miss_layer_rise_pct": 0.7}
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f32", preds=preds, strategy="threshold", n_hot=8, gate=gate)
    lm = open_layout(path)
    header = lm.header
    lm.close()
    own = {k: p for k, p in preds.items() if k.startswith("layer.")}
    assert [s.miss_cut for s in header.predictors.layers] == [own["layer.0"].miss_cuts[1], own["layer.1"].miss_cuts[0]]
    assert header.predictors.gate["miss_layer_recalls"] == [0.9, 0.99]
    with pytest.raises(SparseflashError, match="miss cuts for 3 layers, the model has 2"):
        tiny_layout(tmp_path / "bad", "nemotron", dtype="f32", preds=preds, strategy="threshold", n_hot=8,
                    gate={**gate, "miss_layer_recalls": [0.9, 0.99, 0.9]})


def test_prepare_reruns_the_predictors_when_per_layer_cuts_change_but_not_the_bound():
    """The mixes are planned for the bound in force when the predictors were trained; another --gate-rise
    re-decides among the validated ones without training again."""
    from sparseflash.layout.params import PrepareParams
    from sparseflash.layout.pipeline import _stamp

    base = _stamp(PrepareParams(), "predictors", {})
    assert _stamp(PrepareParams(per_layer_cuts=False), "predictors", {}) != base
    assert _stamp(PrepareParams(gate_rise_pct=0.5), "predictors", {}) == base
    assert _stamp(PrepareParams(order="identity" if PrepareParams.order != "identity" else "coact"), "predictors",
                  {}) == base  # the layout's options do not touch the predictors


def test_spread_ranks_follow_the_active_share_with_the_same_total():
    from sparseflash.layout.predictor_training import active_shares, spread_ranks

    assert spread_ranks(40, [0.1, 0.1, 0.1], 0.5) == [40, 40, 40]  # equal shares: the rank everywhere
    assert spread_ranks(40, [0.4, 0.1, 0.1, 0.1], 0.0) == [40] * 4  # spread 0: uniform
    got = spread_ranks(24, [0.114, 0.045, 0.045, 0.067], 0.5)  # sqrt(active): 0.338, 0.212, 0.212, 0.259 of 4 x 24
    assert got == [round(96 * w / sum(ws)) for ws in [[0.114 ** .5, 0.045 ** .5, 0.045 ** .5, 0.067 ** .5]]
                   for w in ws] and abs(sum(got) - 96) <= 2
    assert spread_ranks(40, [0.9, 1e-6, 1e-6, 1e-6], 1.0) == [80, 10, 10, 10]  # clipped to [rank / 4, 2 rank]
    clipped = spread_ranks(40, [0.9, 0.1, 0.1, 0.1, 0.1, 1e-6], 1.0)  # the first and last clipped, the rest rescaled
    assert clipped[0] == 80 and clipped[-1] == 10 and abs(sum(clipped) - 240) <= 3 and len(set(clipped[1:5])) == 1
    profile = {"layers": [{"sparsity": 0.9, "ppl": {"sparsity": 0.8}}, {"sparsity": 0.95, "ppl": {"sparsity": 0.9}}]}
    assert active_shares(profile, "ppl", 2) == pytest.approx([0.2, 0.1])
    assert active_shares(profile, "cett", 2) == pytest.approx([0.1, 0.05]) and active_shares(profile, "ppl", 3) is None


def test_run_names_the_per_layer_cuts_it_applies():
    from sparseflash.runtime.session import _gate_note

    gate = decide_gate(_report([([0.95, 0.95], 0.8, 44.0)]), {"ppl_p": 1.0, "ppl_p_sparsity": 0.9}, 1.0, 0.5)
    note = _gate_note({"quality_gate": gate, "miss_cut_layers": 2})
    assert "miss cut on 2 layers (0.95/0.95 with 25% in memory, 0.95/0.99 with 50% in memory)" in note
