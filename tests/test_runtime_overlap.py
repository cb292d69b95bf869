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
    """Every (step, layer, positions) the reader is asked for, and the most slots in use seen."""

    def __init__(self, engine):
        self.engine, self.reads = engine, []
        self.peak_used = [0] * len(engine.caches)
        reader = engine.fetcher.reader
        submit = reader.submit

        def logged(layer, positions, dest, dest_slots):
            self.reads.append((len(engine.stats), layer, np.asarray(positions).copy()))
            for l, c in enumerate(engine.caches):
                self.peak_used[l] = max(self.peak_used[l], c.used)
            return submit(layer, positions, dest, dest_slots)

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
