"""Reads that overlap compute (the look-ahead of strategy ``all``, misses read while hits compute,
pipelined batches) read every bundle at most once per step, stay inside the budget, and change no
result."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import tiny_layout

from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.runtime.session import open_streamed


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return tiny_layout(tmp_path_factory.mktemp("overlap"), "nemotron", dtype="f32", n_hot=8)


class ReadLog:
    """Every (step, layer, positions) the reader is asked for, and the most slots in use seen. A read of
    layer 0 asked for during the last layer is the next step's (strategy all reads it ahead)."""

    def __init__(self, engine):
        self.engine, self.reads = engine, []
        self.peak_used = [0] * len(engine.caches)
        reader = engine.fetcher.reader
        submit = reader.submit
        last = len(engine.caches) - 1

        def logged(layer, positions, dest, dest_slots, inline_ok=False):
            wrap = last > 0 and layer == 0 and len(engine._current.timeline) == last
            self.reads.append((len(engine.stats) + wrap, layer, np.asarray(positions).copy()))
            for l, c in enumerate(engine.caches):
                self.peak_used[l] = max(self.peak_used[l], c.used)
            return submit(layer, positions, dest, dest_slots, inline_ok)

        reader.submit = logged

    def per_step(self):
        out = {}
        for step, layer, pos in self.reads:
            out.setdefault((step, layer), []).append(pos)
        return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(share=st.sampled_from(["20%ffn", "25%ffn", "45%ffn", "70%ffn", "100%ffn"]), tokens=st.integers(2, 9),
       prompt=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_all_strategy_reads_each_bundle_once_per_step_within_the_budget(nemotron, share, tokens, prompt, seed):
    dense, path = nemotron
    ids = torch.randint(0, 4096, (1, prompt + tokens), generator=torch.Generator().manual_seed(seed))
    ref = Transformer(dense.config, dense.weights)(ids)
    model = open_streamed(path, share, strategy="all", io_buffer_bytes=4096)
    log = ReadLog(model.engine)
    try:
        cache = KVCache(model.layout.config, ids.shape[1])
        out = [model.transformer(ids[:, :prompt], cache=cache, start=0)]
        out += [model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(prompt, ids.shape[1])]
        plan, engine = model.engine.memory, model.engine
        assert plan.total <= plan.budget
        n = dense.config.intermediate_size
        for (step, layer), reads in log.per_step().items():
            got = np.concatenate(reads)
            assert len(np.unique(got)) == len(got), f"step {step} layer {layer} read a bundle twice"
            assert not np.isin(got, np.arange(engine.regions[layer].n_hot)).any()  # the hot region stays put
            assert len(got) <= n - engine.regions[layer].n_hot
        assert all(p <= c.capacity for p, c in zip(log.peak_used, engine.caches))
        for c in engine.caches:
            c.check()
        assert (torch.cat(out, dim=1) - ref).abs().max().item() <= 1e-4
    finally:
        model.close()


def test_all_strategy_prefetches_the_next_layer_when_it_has_room(nemotron):
    """With room for a whole layer, the first step's reads of layer 1 run while layer 0 works."""
    dense, path = nemotron
    model = open_streamed(path, "150%", strategy="all", io_buffer_bytes=4096)
    try:
        model.transformer(torch.arange(5)[None], cache=KVCache(model.layout.config, 8), start=0)
        s = model.engine.stats[-1]
        ahead = [row[6] for row in s.timeline]  # prefetch bytes in flight after each layer
        assert ahead[0] > 0 and ahead[-1] == 0
        assert s.misses == 0 or s.misses < sum(r.n_neurons - r.n_hot for r in model.engine.regions)
        model.transformer(torch.arange(5, 6)[None], cache=KVCache(model.layout.config, 8), start=0)
        assert model.engine.stats[-1].bytes_read == 0  # everything cached: nothing read again
    finally:
        model.close()


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Eight layers: enough for a staging region to hold a layer's misses (each of its rows costs the
    cache 2 bundles shared by all layers)."""
    return tiny_layout(tmp_path_factory.mktemp("deep"), "nemotron", dtype="f32", n_hot=8, layers=8)


class LayerLog(ReadLog):
    """Also records, for every read, how many layers of the step had finished when it was asked for."""

    def __init__(self, engine):
        super().__init__(engine)
        self.when = []
        submit = engine.fetcher.reader.submit

        def logged(layer, positions, dest, dest_slots, inline_ok=False):
            self.when.append((len(engine.stats), layer, len(engine._current.timeline)))
            return submit(layer, positions, dest, dest_slots, inline_ok)

        engine.fetcher.reader.submit = logged


def test_all_strategy_stages_the_next_layer_so_decode_reads_are_all_ahead(deep):
    """A cache for part of each layer: every uncached neuron of layer l+1 is read into the staging
    region while layer l works, and layer 0's during the step before's last layer, so no decode step
    waits on a demand read, the cache keeps the same neurons from token to token, and the result is
    the dense model's."""
    dense, path = deep
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(5))
    ref = Transformer(dense.config, dense.weights)(ids)
    model = open_streamed(path, "45%ffn", strategy="all", io_buffer_bytes=4096)
    try:
        engine, plan = model.engine, model.engine.memory
        n, layers = dense.config.intermediate_size, len(engine.regions)
        misses = n - engine.regions[0].n_hot - plan.slots_per_layer  # uncached neurons of a layer, every token
        assert engine.staging is not None and plan.staging_rows >= misses > 0  # the staging holds them all
        assert plan.total <= plan.budget
        log = LayerLog(engine)
        cache = KVCache(model.layout.config, ids.shape[1])
        out = [model.transformer(ids[:, :3], cache=cache, start=0)]
        held = [set(c.position_of[c.position_of >= 0].tolist()) for c in engine.caches]
        for i in range(3, ids.shape[1]):
            out.append(model.transformer(ids[:, i : i + 1], cache=cache, start=i))
        assert (torch.cat(out, dim=1) - ref).abs().max().item() <= 1e-4
        assert held == [set(c.position_of[c.position_of >= 0].tolist()) for c in engine.caches]  # no churn
        for step in range(1, len(engine.stats) + 1):
            reads = [(layer, done) for st, layer, done in log.when if st == step]
            # one read a layer, during the layer before; layer 0 (the next step's) during the last
            assert (0, layers - 1) in reads
            if step == 1:  # the first step fills the cache and reads its own layer 0
                continue
            assert sorted(reads) == sorted([(l, l - 1) for l in range(1, layers)] + [(0, layers - 1)])
            s = engine.stats[step - 1]
            # each miss read once (whole 4 KiB blocks: a little more than the bundles)
            assert layers * misses * engine.regions[0].bundle_bytes <= s.bytes_read <= s.requests * 4096 + \
                layers * misses * engine.regions[0].bundle_bytes
            assert s.misses == layers * misses and s.prefetched == layers * misses
            assert [row[6] for row in s.timeline] == [misses * engine.regions[0].bundle_bytes] * layers
        for c in engine.caches:
            c.check()
    finally:
        model.close()


@pytest.mark.parametrize("share", ["25%ffn", "45%ffn"])
def test_staging_changes_no_result_and_costs_the_slots_it_takes(deep, share):
    """The same tokens with and without the staging region: the same outputs (to float rounding: the
    sums split differently), and a decode step reads, with staging, the neurons of the cache slots it
    took from every layer on top (every uncached neuron is read once a token either way)."""
    dense, path = deep
    outs, reads, plans = [], [], []
    for staging in (True, False):
        model = open_streamed(path, share, strategy="all", io_buffer_bytes=4096, staging=staging)
        try:
            outs.append(_teacher_forced(model))
            reads.append(model.engine.stats[-1].misses)
            plans.append(model.engine.memory)
        finally:
            model.close()
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    on, off = plans
    assert off.staging == 0 and on.staging > 0 and on.slots_per_layer < off.slots_per_layer
    assert on.total <= on.budget and off.total <= off.budget
    lost = (off.slots_per_layer - on.slots_per_layer) * dense.config.num_layers
    assert reads[0] - reads[1] == lost  # neurons read in a decode step: those slots' more


def _teacher_forced(model):
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(9))
    cache = KVCache(model.layout.config, ids.shape[1])
    out = [model.transformer(ids[:, :2], cache=cache, start=0)]
    out += [model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(2, ids.shape[1])]
    return torch.cat(out, dim=1)


def test_a_layers_own_read_is_queued_before_the_next_layers_look_ahead(tmp_path):
    """On the host the I/O threads take reads in order: the read a layer waits for goes first, the
    look-ahead read of the next layer after it (queued first, it would delay the wait)."""
    from test_runtime_timeline import random_predictors

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=random_predictors(3), strategy="topk")
    model = open_streamed(path, "30%ffn", io_buffer_bytes=4096, lookahead=True)
    engine = model.engine
    order, layer_now = [], []
    layer = engine._layer

    def tracked(l, *args):
        layer_now.append(l)
        return layer(l, *args)

    engine._layer = tracked
    log = ReadLog(engine)
    submit = engine.fetcher.reader.submit

    def ordered(layer, positions, dest, dest_slots, inline_ok=False):
        order.append((len(engine.stats), layer_now[-1] if layer_now else None, layer))
        return submit(layer, positions, dest, dest_slots, inline_ok)

    engine.fetcher.reader.submit = ordered
    try:
        ids = torch.randint(0, 4096, (1, 10), generator=torch.Generator().manual_seed(3))
        cache = KVCache(model.layout.config, 10)
        for i in range(10):
            model.transformer(ids[:, i : i + 1], cache=cache, start=i)
    finally:
        model.close()
    both = 0
    for step in {s for s, _, _ in order}:
        for l in range(3):
            own = [k for k, (s, during, layer) in enumerate(order) if s == step and during == l and layer == l]
            ahead = [k for k, (s, during, layer) in enumerate(order) if s == step and during == l and layer == l + 1]
            if own and ahead:
                both += 1
                assert own[0] < ahead[0], f"step {step} layer {l}: the look-ahead read was queued first"
    assert both > 0 and log.reads  # some layer step had both reads: the order was tested
