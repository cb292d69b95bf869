"""The cache split among layers by demand (layout/schema_cache.py, layout/cache_demand.py): the replay
that measures each layer's demand, worked out by hand; the split against brute force; the memory plan
spending no more than an even split; the record read back from a layout, and a lying one refused; the
validation's caches taking each layer's share."""

import itertools
import json

import numpy as np
import pytest
import torch
from layouts import tiny_layout
from test_predicted_sets import _predictors
from test_schema import _set, _with_header

from sparseflash.errors import ArtefactError
from sparseflash.layout import cache_demand
from sparseflash.layout.format import FfnLayer
from sparseflash.layout.miss_cut import MissRun
from sparseflash.layout.schema_cache import MIN_SLOTS, CacheDemand, split_shares, split_slots
from sparseflash.runtime.budget import plan_memory
from sparseflash.runtime.layout_model import open_layout
from sparseflash.runtime.policy import Budget, Policy
from sparseflash.runtime.session import open_streamed


def _trace(*sets, neurons=3):
    m = np.zeros((len(sets), neurons), dtype=bool)
    for t, s in enumerate(sets):
        m[t, list(s)] = True
    return m


def test_the_replay_evicts_by_recent_use_rate_outside_the_window():
    """Neuron 0 fires three times, then 1 and 2 once each, then 0 again; two slots. With decay 0.9 the
    rate of 0 at token 4 is 2.44 against 1 for neuron 1, so 1 goes and 0 is a hit at token 5 (LRU would
    evict 0): misses at tokens 0, 3 and 4. With a window of one token, neuron 1 (used at token 3) is
    protected and 0 (last used at token 2) goes: token 5 misses too."""
    m = _trace({0}, {0}, {0}, {1}, {2}, {0})
    plain = dict(decay=0.9, probation_uses=0.0)  # nothing on probation
    assert cache_demand.replay_misses(m, 2, window=0, warmup=0, **plain) == pytest.approx(3 / 6)
    assert cache_demand.replay_misses(m, 2, window=1, warmup=0, **plain) == pytest.approx(4 / 6)
    assert cache_demand.replay_misses(m, 3, window=1, warmup=0, **plain) == pytest.approx(3 / 6)  # all fit
    assert cache_demand.replay_misses(m, 2, window=0, warmup=4, **plain) == pytest.approx(1 / 2)  # tokens 4-5 counted
    # more active neurons than slots: each is read, and the cache keeps what fits
    assert cache_demand.replay_misses(_trace({0, 1, 2}, {0, 1, 2}), 2, window=0, warmup=0) == pytest.approx(4 / 2)


def test_the_replay_puts_rarely_used_neurons_on_probation():
    """The trace above with a window of one token and probation below 2 decayed uses: neuron 0 is read at
    token 0 on probation (no uses before) and leaves it at token 1 (used again); neuron 1, read at token 3
    with no uses before, is on probation, so the window does not protect it: at token 4 it goes, not 0
    (which the window no longer holds), and token 5 hits 0: misses at tokens 0, 3 and 4, where the plain
    rule misses token 5 too."""
    m = _trace({0}, {0}, {0}, {1}, {2}, {0})
    assert [t.tolist() for t in cache_demand.replay(m, 2, window=1, decay=0.9, probation_uses=2.0)] == \
        [[0], [], [], [1], [2], []]
    assert [t.tolist() for t in cache_demand.replay(m, 2, window=1, decay=0.9, probation_uses=0.0)] == \
        [[0], [], [], [1], [2], [0]]


def test_the_replay_follows_the_runtime_defaults():
    from sparseflash.runtime.cache import FREQUENCY_DECAY, PROBATION_USES

    assert cache_demand.WINDOW == Policy.window and cache_demand.DECAY == FREQUENCY_DECAY
    assert cache_demand.PROBATION_USES == PROBATION_USES
    assert MIN_SLOTS == Policy.min_slots


def _convex(first: float, rate: float, shares):
    return tuple(first * np.exp(-rate * s) for s in shares)


def test_the_split_matches_brute_force_and_spends_only_the_budget():
    """Three layers of 20 neurons with convex demand: the greedy split (steps of one slot here) reads as few
    neurons as the best split found by trying every one, within the same bytes; floors and sizes held."""
    shares = tuple(np.linspace(0.05, 1.0, 20))
    demand = CacheDemand(shares, (_convex(30, 6, shares), _convex(5, 3, shares), _convex(12, 10, shares)))
    neurons, hot, costs, floor = [20] * 3, [2] * 3, [1, 1, 1], [2] * 3

    def misses(x):
        return sum(demand.at(l, (hot[l] + x[l]) / neurons[l]) for l in range(3))

    for budget in (6, 15, 30, 54):
        got = split_slots(demand, neurons, hot, costs, budget, floor)
        assert sum(got) <= budget and all(floor[l] <= got[l] <= 18 for l in range(3))
        best = min(misses(x) for x in itertools.product(range(2, 19), repeat=3) if sum(x) <= budget)
        assert misses(got) == pytest.approx(best, abs=1e-9)
    assert split_slots(demand, neurons, hot, costs, 54, floor) == [18, 18, 18]  # everything fits


def test_flat_demand_splits_evenly_and_costs_count_bytes():
    flat = CacheDemand((0.1, 1.0), ((1.0, 1.0),) * 4)
    assert split_slots(flat, [100] * 4, [10] * 4, [1] * 4, 200, [16] * 4) == [50] * 4
    steep = CacheDemand((0.01, 1.0), ((10.0, 0.0), (10.0, 0.0)))
    got = split_slots(steep, [100, 100], [0, 0], [2, 1], 150, [0, 0])  # layer 0's slots cost twice as much
    assert got == [25, 100]  # the same reads saved a slot: the cheaper slots first, then what bytes remain
    assert split_shares(flat, [100] * 4, [10] * 4, 0.5, 16) == [0.5] * 4


def test_a_bad_demand_record_is_refused():
    with pytest.raises(ValueError, match="ascending"):
        CacheDemand((0.5, 0.1), ((1.0, 2.0),))
    with pytest.raises(ValueError, match="layer 0"):
        CacheDemand((0.1, 0.5), ((1.0, -2.0),))
    with pytest.raises(ValueError, match="layer 1"):
        CacheDemand((0.1, 0.5), ((1.0, 0.5), (1.0,)))
    # a larger cache never reads more: the record is read as non-increasing
    assert CacheDemand((0.1, 0.5, 1.0), ((4.0, 1.0, 3.0),)).at(0, 1.0) == 1.0


def _regions(n=(200, 200, 200), hot=20, bundle=256):
    return [FfnLayer(l, 64, k, False, "f16", bundle, 0, 0, hot, 0.0, f"perm.{l}", k, None, np.zeros(k, np.uint64))
            for l, k in enumerate(n)]


def test_the_memory_plan_splits_the_same_bytes_by_demand():
    regions = _regions()
    demand = CacheDemand((0.1, 0.3, 1.0), ((50.0, 5.0, 0.0), (1.0, 0.5, 0.0), (10.0, 1.0, 0.0)))
    budget = Budget(ffn_share=0.3)
    even = plan_memory(regions, 1000, 100, 4096, budget, 16)
    split = plan_memory(regions, 1000, 100, 4096, budget, 16, demand=demand)
    assert not even.split and even.layer_slots == (even.slots_per_layer,) * 3
    assert split.split and split.total <= even.total and split.slots_per_layer == even.slots_per_layer
    assert sum(split.layer_slots) == sum(even.layer_slots)  # every bundle the same size: the same slots in all
    assert split.layer_slots == (64, 16, 40)  # layer 0's steep part, layer 2's, then layer 0's flatter part
    assert split.cache == sum(split.layer_slots) * 256 and [split.slots_of(l) for l in range(3)] == list(split.layer_slots)


def test_a_layout_records_the_demand_and_a_run_splits_its_cache(tmp_path, capsys):
    demand = CacheDemand((0.1, 1.0), ((40.0, 0.0), (2.0, 0.0)))
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), strategy="topk", demand=demand)
    lm = open_layout(path)
    assert lm.header.predictors.cache_demand == demand
    lm.close()
    sizes = {}
    for split in (True, False):
        model = open_streamed(path, "40%ffn", split_cache=split)
        try:
            sizes[split] = [c.capacity for c in model.engine.caches]
            assert model.engine.memory.split is split
        finally:
            model.close()
    assert sizes[True][0] > sizes[True][1] and sizes[False][0] == sizes[False][1]
    assert sum(sizes[True]) == sum(sizes[False])  # the same slots, placed by demand
    from sparseflash.tools.cli import main

    capsys.readouterr()
    assert main(["run", "-m", str(path), "--budget", "40%ffn", "-n", "2", "--even-cache", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    slots = out["memory_plan"]["layer_slots"]
    assert slots[0] == slots[1] and out["memory_plan"]["split"] is False
    assert main(["run", "-m", str(path), "--budget", "40%ffn", "-n", "2"]) == 0
    said = capsys.readouterr()
    split = [sizes[True][l] - lm.file.layers[l].n_hot for l in range(2)]
    assert f"cache slots by layer {split[0]}/{split[1]}, split by demand" in said.out + said.err


@pytest.mark.parametrize("edit, text", [
    (_set("predictors.cache_demand", {"shares": [0.1, 1.0], "misses": [[1.0, 0.0]]}), "cache_demand"),
    (_set("predictors.cache_demand", {"shares": [1.0, 0.1], "misses": [[1.0, 0.0]] * 2}), "ascending"),
    (_set("predictors.cache_demand", {"shares": [0.1, 1.0], "misses": [[1.0, "x"]] * 2}), "cache_demand.misses"),
    (_set("predictors.cache_demand", {"shares": [0.1, 1.0]}), "cache_demand.misses"),
])
def test_a_lying_cache_demand_is_one_line(tmp_path, edit, text):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), strategy="topk",
                          demand=CacheDemand((0.1, 1.0), ((4.0, 0.0), (2.0, 0.0))))
    bad = _with_header(path, tmp_path / "bad.sflash", edit)
    with pytest.raises(ArtefactError) as caught:
        open_layout(bad)
    assert text in str(caught.value) and "\n" not in str(caught.value)


def test_the_validation_cache_takes_each_layer_its_share():
    """MissRun with one share per layer: a layer whose cache holds all its neurons reads each neuron at most
    once a window; one share for all layers equals that share given per layer."""
    from sparseflash.layout.predictor import Predictor

    g = torch.Generator().manual_seed(0)
    pred = Predictor(torch.randn(4, 8, generator=g), torch.zeros(4), torch.randn(16, 4, generator=g),
                     torch.zeros(16), topk=4, cut=-0.5)
    x, a = torch.randn(2 * 8, 8, generator=g), torch.rand(2 * 8, 16, generator=g)
    runs = {"split": MissRun(8, 2, [0.25, 1.0]), "even": MissRun(8, 2, 0.25), "even list": MissRun(8, 2, [0.25, 0.25])}
    for run in runs.values():
        for layer in range(2):
            run.hook(pred, miss_cut=-1e9)(layer, None, x, a)
    assert np.array_equal(runs["even"].read, runs["even list"].read)
    computed = (pred.logits(x) > pred.cut).view(2, 8, 16)
    assert runs["split"].read[1] == computed.any(dim=1).sum()  # each neuron read once per window, then held
    assert runs["split"].read[0] == runs["even"].read[0] and runs["split"].read[1] < runs["even"].read[1]


def test_look_ahead_is_off_by_default_and_run_lookahead_holds_and_uses_its_predictors(tmp_path, capsys):
    """`run` reads nothing ahead unless asked (`--lookahead`): then the look-ahead predictors are held (in
    the memory plan) and reads start one layer early; `--no-lookahead` is the default."""
    from sparseflash.tools.cli import main

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), strategy="topk")
    plans = {}
    for flags in ([], ["--lookahead"], ["--no-lookahead"]):
        capsys.readouterr()
        assert main(["run", "-m", str(path), "--budget", "40%ffn", "-n", "3", "--json", *flags]) == 0
        plans[tuple(flags)] = json.loads(capsys.readouterr().out)["memory_plan"]["predictors"]
    assert plans[()] == plans[("--no-lookahead",)] < plans[("--lookahead",)]
    for on in (False, True):
        model = open_streamed(path, "40%ffn", lookahead=on)
        try:
            model.transformer(torch.tensor([[5, 6, 7, 8]]))
            assert bool(model.engine.predictors.lookahead) is on
            assert (sum(s.prefetched for s in model.engine.stats) > 0) is on
        finally:
            model.close()
