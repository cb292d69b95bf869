"""The streamed engine computes what the dense engine computes, within its budget."""

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.runtime.budget import BudgetError
from sparseflash.runtime.session import open_streamed
from sparseflash.tools.cli import main


def _teacher_forced(model, ids, prefill=6):
    cache = KVCache(model.config, ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache, start=0)]
    out += [model(ids[:, i : i + 1], cache=cache, start=i) for i in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", ["nemotron", "llama-silu"])
def test_all_neurons_streamed_equals_dense_at_the_minimum_budget(family, tmp_path):
    dense, path = tiny_layout(tmp_path, family, dtype="f32")
    ids = torch.randint(0, 4096, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = Transformer(dense.config, dense.weights)(ids)
    probe = open_streamed(path, 1 << 40, strategy="all", io_buffer_bytes=4096, io_threads=2)  # I/O planned alike
    minimum = probe.engine.memory.minimum
    probe.close()
    model = open_streamed(path, minimum, strategy="all", io_buffer_bytes=4096, io_threads=2)
    try:
        # the smallest cache the engine accepts, far below the 160 neurons every token needs
        assert model.engine.memory.slots_per_layer == model.engine.policy.min_slots
        out = _teacher_forced(model.transformer, ids)
        assert (out - ref).abs().max().item() <= 1e-4
        assert sum(s.bytes_read for s in model.engine.stats) > 0
        for cache in model.engine.caches:
            cache.check()
            assert cache.capacity < dense.config.intermediate_size
    finally:
        model.close()
    with pytest.raises(BudgetError, match="below the minimum"):
        open_streamed(path, minimum - 1, strategy="all", io_buffer_bytes=4096)


@pytest.mark.parametrize("budget", ["25%ffn", "60%ffn", "3MB", "150%"])
def test_what_the_engine_allocates_is_what_the_plan_says(tmp_path, budget):
    dense, path = tiny_layout(tmp_path, "llama-silu", dtype="f16", n_hot=8)
    model = open_streamed(path, budget, strategy="all", io_buffer_bytes=4096)
    try:
        plan, engine = model.engine.memory, model.engine
        assert plan.total <= plan.budget
        assert sum(c.slots.nbytes for c in engine.caches) == plan.hot + plan.cache  # bundle bytes held
        assert (engine.staging.nbytes if engine.staging is not None else 0) == plan.staging
        largest = max(r.bundle_bytes for r in engine.regions)
        staged = 2 * plan.staging_rows * largest  # the staging region's bundle bytes (the rest is its index)
        assert engine.fetcher.reader.buffer_total_bytes == plan.io_buffers
        weights = {id(t): t for t in model.transformer.weights.named().values()}
        assert sum(t.numel() * t.element_size() for t in weights.values()) == plan.resident
        if budget.endswith("%ffn"):  # hot region + cache + staging = that share of the FFN bytes, to a slot
            share = float(budget[:-4]) / 100
            row = sum(r.bundle_bytes for r in engine.regions)  # one more slot in every layer
            index = plan.staging - staged  # the staging index comes out of the same bytes
            bundles = plan.hot + plan.cache + staged
            assert share * model.layout.ffn_bytes - row - index < bundles <= share * model.layout.ffn_bytes
    finally:
        model.close()


def test_a_bigger_budget_never_gives_a_smaller_cache(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", n_hot=8)
    slots = []
    for share in ("20%ffn", "40%ffn", "60%ffn", "80%ffn", "100%ffn"):
        model = open_streamed(path, share, strategy="all", io_buffer_bytes=4096)
        slots.append(model.engine.memory.slots_per_layer)
        model.close()
    assert slots == sorted(slots) and slots[0] < slots[-1]
    assert slots[-1] == 160 - 8  # the whole layer fits: every neuron has a slot


def test_f16_layout_is_close_to_dense(tmp_path):
    dense, path = tiny_layout(tmp_path, "nemotron", dtype="f16")
    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = Transformer(dense.config, dense.weights)(ids)
    model = open_streamed(path, "150%", strategy="all")
    try:
        out = _teacher_forced(model.transformer, ids)
        assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    finally:
        model.close()


def test_budget_below_minimum_is_refused(tmp_path, capsys):
    _, path = tiny_layout(tmp_path, "nemotron")
    with pytest.raises(BudgetError, match="below the minimum of"):
        open_streamed(path, 1000, strategy="all")
    capsys.readouterr()
    code = main(["run", "-m", str(path), "--budget", "1KB", "--strategy", "all", "-n", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "below the minimum of" in err and len(err.strip().splitlines()) == 1


def test_run_json_reports_io(tmp_path, capsys):
    _, path = tiny_layout(tmp_path, "nemotron")
    code = main(["run", "-m", str(path), "--budget", "3MB", "--strategy", "all", "-n", "5", "--greedy",
                 "--ignore-eos", "--json", "--stats", str(tmp_path / "stats.json")])
    import json

    r = json.loads(capsys.readouterr().out)
    assert code == 0 and len(r["tokens"]) == 5
    for key in ("bytes_read", "requests", "peak_rss_bytes", "budget_bytes", "tokens_per_s"):
        assert key in r
    assert r["bytes_read"] > 0 and r["requests"] > 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(stats["tokens"]) == 5  # prefill + 4 decode steps


def test_layout_without_predictors_refuses_predicted_strategy(tmp_path):
    from sparseflash.errors import ArtefactError

    _, path = tiny_layout(tmp_path, "nemotron")
    with pytest.raises(ArtefactError, match="has no predictors"):
        open_streamed(path, "200%", strategy="topk")


def test_predicted_engine_reads_only_predicted_bundles(tmp_path):
    from sparseflash.layout.predictor import Predictor

    g = torch.Generator().manual_seed(0)
    c_layers, n, d = 2, 160, 64
    preds = {}
    for l in range(c_layers):
        preds[f"layer.{l}"] = Predictor(torch.randn(8, d, generator=g), torch.zeros(8),
                                        torch.randn(n, 8, generator=g), torch.zeros(n), topk=10, cut=2.0)
    _, path = tiny_layout(tmp_path, "nemotron", n_hot=0, preds=preds, strategy="topk")
    model = open_streamed(path, "200%", lookahead=False)
    try:
        ids = torch.arange(12)[None]
        model.transformer(ids[:, :1], cache=KVCache(model.layout.config, 2), start=0)
        s = model.engine.stats[-1]
        assert s.predicted == 2 * 10 and s.misses == 20
        assert 0 < s.bytes_read <= 20 * 4096 * 2  # each bundle (512 B) costs at most its aligned blocks
        assert np.all([c.used == 10 for c in model.engine.caches])
    finally:
        model.close()


def test_memory_plan_of_layers_that_differ():
    from types import SimpleNamespace

    from sparseflash.runtime.budget import plan_memory
    from sparseflash.runtime.policy import Budget

    regions = [SimpleNamespace(n_neurons=n, n_hot=h, bundle_bytes=bb)
               for n, h, bb in ((100, 10, 512), (400, 0, 2048), (60, 30, 128))]
    previous = -1
    for nbytes in range(200_000, 2_000_000, 50_000):
        plan = plan_memory(regions, 1000, 500, 4096, Budget(nbytes=nbytes), min_slots=4)
        assert plan.total <= nbytes
        # what the caches hold: every layer's hot region and the same number of extra slots, each its own size
        held = sum((r.n_hot + plan.slots_per_layer) * r.bundle_bytes for r in regions)
        assert plan.hot + plan.cache == held
        assert plan.slots_per_layer <= 30  # the third layer has only 30 neurons beyond its hot region
        assert plan.slots_per_layer >= previous
        previous = plan.slots_per_layer
    assert previous == 30


def test_the_staging_region_holds_one_layers_misses_and_leaves_the_minimum_cache():
    from types import SimpleNamespace

    from sparseflash.runtime.budget import plan_memory, staging_region_bytes
    from sparseflash.runtime.policy import Budget

    regions = [SimpleNamespace(n_neurons=1000, n_hot=50, bundle_bytes=1024) for _ in range(12)]
    plain = plan_memory(regions, 1000, 500, 4096, Budget(nbytes=1 << 40), min_slots=16, stage_all=True)
    assert plain.staging_rows == 0 and plain.slots_per_layer == 950  # every layer fits: nothing to stage
    for share in (0.2, 0.4, 0.6, 0.9):
        for budget in (Budget(ffn_share=share), Budget(nbytes=int(share * 12 * 1000 * 1024))):
            off = plan_memory(regions, 1000, 500, 4096, budget, min_slots=16)
            on = plan_memory(regions, 1000, 500, 4096, budget, min_slots=16, stage_all=True)
            assert on.total <= on.budget and on.staging == staging_region_bytes(regions, on.staging_rows)
            assert on.slots_per_layer >= 16 and on.slots_per_layer <= off.slots_per_layer
            misses = 950 - on.slots_per_layer
            if on.slots_per_layer > 16:  # not held down by the minimum: a half takes all of a layer's misses
                assert on.staging_rows == misses
            else:
                assert 0 < on.staging_rows <= misses
            if budget.ffn_share is not None:  # bundles of hot region, cache and staging: that share, to a slot
                bundles = on.hot + on.cache + 2 * on.staging_rows * 1024
                assert share * 12_288_000 - 12 * 1024 < bundles <= share * 12_288_000  # the plan's own product
    low = plan_memory(regions, 1000, 500, 4096, Budget(nbytes=plain.minimum), min_slots=16, stage_all=True)
    assert low.staging_rows == 0 and low.slots_per_layer == 16  # at the minimum there is no room to stage
