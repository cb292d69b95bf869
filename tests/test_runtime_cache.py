"""The neuron cache keeps slot contents and index in step and never grows past its capacity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseflash.runtime.cache import NeuronCache

NEURONS, CAPACITY = 40, 12

ops = st.lists(st.one_of(
    st.tuples(st.just("need"), st.lists(st.integers(0, NEURONS - 1), min_size=0, max_size=CAPACITY, unique=True)),
    st.tuples(st.just("tick"), st.just([])),
    st.tuples(st.just("evict_one"), st.just([])),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 3), st.sampled_from(["lru", "lfu", "predicted", "window"]), st.integers(0, 3))
def test_cache_matches_a_simple_model(operations, window, policy, pinned):
    cache = NeuronCache(NEURONS, CAPACITY, 2, np.float32, window=window, policy=policy)
    scores = np.random.default_rng(len(operations)).standard_normal(NEURONS).astype(np.float32)
    model = {}  # position -> slot content
    hot = cache.reserve(pinned)
    cache.slots[hot, 0] = np.arange(pinned)
    cache.commit(hot, np.arange(pinned), pinned=True)
    for p in range(pinned):
        model[p] = p
    for op, arg in operations:
        if op == "tick":
            cache.tick()
            if policy == "window":  # neurons outside the window leave at once
                for p in [p for p in model if cache.slot_of[p] < 0]:
                    model.pop(p)
        elif op == "evict_one":
            victims = cache.evictable()
            if len(victims):
                model.pop(int(cache.position_of[victims[0]]))
                cache.evict(victims[:1])
        else:
            positions = np.array(arg, dtype=np.int64)
            cache.note_scores(scores)
            slots = cache.lookup(positions)
            hit = slots[slots >= 0]
            cache.touch(hit)
            missing = positions[slots < 0]
            room = cache.free_count() + len(cache.evictable(protect=hit))
            if len(missing) > room:
                with pytest.raises(MemoryError):
                    cache.reserve(len(missing), protect=hit)
                continue
            before = {int(p): int(cache.slot_of[p]) for p in model}
            new = cache.reserve(len(missing), protect=hit)
            for p, s in before.items():  # evicted ones leave the model
                if cache.slot_of[p] != s:
                    model.pop(p)
            cache.slots[new, 0] = missing
            cache.commit(new, missing)
            cache.touch(new)
            for p in missing:
                model[int(p)] = int(p)
            for p in positions:  # everything needed is now cached and holds its own bytes
                assert cache.slots[cache.slot_of[p], 0] == p
            for p in range(pinned):
                assert cache.slot_of[p] >= 0  # pinned neurons are never evicted
        cache.check()
        assert cache.used <= CAPACITY
        assert set(np.nonzero(cache.slot_of >= 0)[0].tolist()) == set(model)
        for p, v in model.items():
            assert cache.slots[cache.slot_of[p], 0] == v


def test_window_protects_recent_neurons():
    cache = NeuronCache(10, 3, 1, np.float32, window=2, policy="lru")
    s = cache.reserve(3)
    cache.commit(s, np.array([0, 1, 2]))
    assert len(cache.evictable()) == 0  # all used in this token
    cache.tick()
    cache.tick()
    cache.touch(cache.lookup(np.array([1])))
    cache.tick()
    assert sorted(cache.position_of[cache.evictable()].tolist()) == [0, 2]


def test_lru_and_lfu_pick_different_victims():
    for policy, expect in (("lru", 0), ("lfu", 1)):
        cache = NeuronCache(10, 2, 1, np.float32, window=0, policy=policy)
        s = cache.reserve(2)
        cache.commit(s, np.array([0, 1]))
        for _ in range(3):
            cache.tick()
            cache.touch(cache.lookup(np.array([0])))
        cache.tick()
        cache.touch(cache.lookup(np.array([1])))
        cache.tick()
        assert cache.position_of[cache.evictable()[0]] == expect


def test_predicted_policy_evicts_the_lowest_score_first():
    cache = NeuronCache(10, 3, 1, np.float32, window=0, policy="predicted")
    s = cache.reserve(3)
    cache.commit(s, np.array([4, 5, 6]))
    cache.tick()
    cache.touch(cache.lookup(np.array([4])))  # 4 is the most recent, but the predictor rates it lowest
    cache.tick()
    cache.note_scores(np.array([0, 0, 0, 0, -3.0, 2.0, 1.0, 0, 0, 0], dtype=np.float32))
    assert cache.position_of[cache.evictable()].tolist() == [4, 6, 5]
    cache.evict(cache.evictable()[:1])
    cache.tick()
    cache.note_scores(np.full(10, 7.0, dtype=np.float32))  # equal scores: oldest first, as LRU
    assert cache.position_of[cache.evictable()].tolist() == [5, 6]


def test_window_policy_drops_neurons_that_left_the_window():
    cache = NeuronCache(10, 4, 1, np.float32, window=1, policy="window")
    s = cache.reserve(2)
    cache.commit(s, np.array([1, 2]))
    cache.tick()
    assert cache.used == 2  # used one token ago: inside the window
    cache.touch(cache.lookup(np.array([2])))
    cache.tick()
    assert sorted(np.nonzero(cache.slot_of >= 0)[0].tolist()) == [2]  # 1 left the window and was dropped
