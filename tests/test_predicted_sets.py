"""The runtime computes exactly the neurons the layout-side predictors choose: the stored positions
are the checkpoint-order choice mapped through the layer's neuron permutation, and the streamed
output equals a dense forward that keeps only those neurons (look-ahead prefetch and eviction on)."""

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.predictor import Predictor
from sparseflash.layout.schema import permutation_tensor
from sparseflash.layout.schema_cache import CacheDemand
from sparseflash.model.transformer import KVCache
from sparseflash.runtime.layout_model import open_layout
from sparseflash.runtime.predict import load_predictors
from sparseflash.runtime.session import open_streamed


def _predictors(layers: int, n: int = 160, d: int = 64, topk: int = 24) -> dict:
    g = torch.Generator().manual_seed(3)
    make = lambda: Predictor(torch.randn(8, d, generator=g), torch.randn(8, generator=g),  # noqa: E731
                             torch.randn(n, 8, generator=g), torch.randn(n, generator=g), topk=topk, cut=1.5)
    preds = {f"layer.{l}": make() for l in range(layers)}
    preds.update({f"lookahead.{l}": make() for l in range(1, layers)})
    return preds


@pytest.mark.parametrize("strategy", ["topk", "threshold"])
def test_runtime_positions_are_the_predictor_choice_mapped_through_the_permutation(tmp_path, strategy):
    preds = _predictors(2)
    _, path = tiny_layout(tmp_path, "nemotron", preds=preds, strategy=strategy)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    lm = open_layout(path)
    try:
        runtime = load_predictors(lm.file, lm.header, strategy)
        for l in range(2):
            perm = np.asarray(lm.file.tensor(permutation_tensor(l)))
            for kind, own in (("layer", runtime.own), ("lookahead", runtime.lookahead)):
                if f"{kind}.{l}" not in preds:
                    continue
                chosen = preds[f"{kind}.{l}"].predict(x, strategy).any(dim=0).numpy()  # checkpoint order
                stored = np.nonzero(chosen[perm])[0]  # stored position s holds neuron perm[s]
                got = own[l].predict(x, strategy)
                assert np.array_equal(got, stored)
                assert not np.array_equal(got, np.nonzero(chosen)[0])  # the permutation matters here
    finally:
        lm.close()


COST_AWARE = dict(cached_bonus=1.0, miss_penalty=3.0, eviction="forecast")
# a cache split by demand: layer 0 reads far more than layer 1 with a small cache (layout/schema_cache.py)
SPLIT = dict(demand=CacheDemand((0.1, 1.0), ((40.0, 0.0), (2.0, 0.0))))


@pytest.mark.parametrize("family, budget, policy", [("nemotron", "30%ffn", {}), ("llama-relu", "45%ffn", {}),
                                                    ("nemotron", "30%ffn", COST_AWARE),
                                                    ("llama-relu", "45%ffn", COST_AWARE),
                                                    ("nemotron", "30%ffn", SPLIT),
                                                    ("nemotron", "30%ffn", {"lookahead": False})])
def test_streamed_engine_equals_dense_masked_to_the_same_neurons(tmp_path, family, budget, policy):
    """f32 layout, top-k predictors with look-ahead (and without), a cache far below the layer (with and without
    cost-aware selection, and split among layers by demand): the streamed logits equal a dense forward
    whose FFNs keep only the neurons the engine computed."""
    policy = {"lookahead": True, **policy}  # with look-ahead (run --lookahead), but where the case turns it off
    demand = policy.pop("demand", None)
    dense, path = tiny_layout(tmp_path, family, dtype="f32", preds=_predictors(2), strategy="topk", n_hot=8,
                              demand=demand)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    model = open_streamed(path, budget, io_buffer_bytes=4096, **policy)
    try:
        assert bool(model.engine.predictors.lookahead) == model.engine.policy.lookahead == policy["lookahead"]
        model.engine.trace = [[] for _ in range(2)]
        cache = KVCache(model.layout.config, ids.shape[1])
        out = torch.cat([model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(ids.shape[1])], 1)
        trace = model.engine.trace
        assert sum(s.bytes_read for s in model.engine.stats) > 0
        # look-ahead reads happened (with the split, layer 1 keeps the minimum 16 slots: room for none)
        assert demand or not policy["lookahead"] or sum(s.prefetched for s in model.engine.stats) > 0
        assert policy["lookahead"] or sum(s.prefetched for s in model.engine.stats) == 0  # off: none
        assert model.engine.memory.slots_per_layer < 160 - 8
        capacities = [c.capacity for c in model.engine.caches]
        assert (capacities[0] > capacities[1]) if demand else capacities[0] == capacities[1]
        perms = [np.asarray(model.layout.file.tensor(permutation_tensor(l))) for l in range(2)]
    finally:
        model.close()
    calls = [0, 0]

    def keep_computed(l, x, a):  # the neurons the engine computed at this call, in checkpoint order
        keep = torch.zeros(a.shape[1], dtype=torch.bool)
        keep[perms[l][trace[l][calls[l]]]] = True
        calls[l] += 1
        return a * keep

    masked = NeuronTap(dense.weights).transformer(dense.config, keep_computed)
    kv = KVCache(dense.config, ids.shape[1])
    ref = torch.cat([masked(ids[:, i : i + 1], cache=kv, start=i) for i in range(ids.shape[1])], 1)
    assert calls == [ids.shape[1]] * 2
    assert (out - ref).abs().max().item() <= 1e-4
    full = dense_logits(dense, ids)
    assert (out - full).abs().max().item() > 1e-3  # the masks drop neurons that matter: the test can fail


def dense_logits(dense, ids):
    from sparseflash.model.transformer import Transformer

    return Transformer(dense.config, dense.weights)(ids)
