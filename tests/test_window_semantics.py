"""``--window K`` means one thing everywhere: a neuron used by the current token or by one of the K
tokens before it is protected from eviction. Pinned by a small trace worked out by hand, replayed
through the runtime's cache (as the engine drives it) and through the simulator."""

import numpy as np
import pytest

from sparseflash.eval.simulate import simulate_layer
from sparseflash.runtime.cache import NeuronCache
from sparseflash.runtime.planner import plan_layer

# Two slots, LFU beyond the window. Neuron 0 is used twice (t0, t1), then 1, 2, 0 once each.
TRACE = [[0], [0], [1], [2], [0]]
# window 1, worked by hand:
#   t0 miss 0 | t1 hit 0 (0 has 2 uses) | t2 miss 1 (free slot)
#   t3 needs 2, both slots full: 1 was used by t2, the token before, so it is protected; 0 (last
#      used at t1) is the only victim, although LFU would rather keep it   -> miss 2, cache {1, 2}
#   t4 needs 0: 2 (used by t3) is protected, 1 is evicted                    -> miss 0, cache {2, 0}
WINDOW_1 = [[0], [], [1], [2], [0]]
# window 0 protects only the current token: at t3 LFU evicts 1 (one use) and keeps 0 -> t4 hits 0
WINDOW_0 = [[0], [], [1], [2], []]


def _cache_misses(trace, window, policy="lfu", capacity=2):
    """Replay ``trace`` through a NeuronCache as the engine does: tick, plan, touch hits, reserve
    (hits protected), commit, touch."""
    cache = NeuronCache(neurons=8, capacity=capacity, bundle_len=1, dtype=np.float32, window=window, policy=policy)
    out = []
    for need in trace:
        cache.tick()
        plan = plan_layer(cache, np.array(need, dtype=np.int64))
        assert plan.fits
        cache.touch(plan.hit_slots)
        new = cache.reserve(len(plan.missing), protect=plan.hit_slots)
        cache.commit(new, plan.missing)
        cache.touch(new)
        cache.check()
        out.append(sorted(plan.missing.tolist()))
    return out


@pytest.mark.parametrize("window, expected", [(1, WINDOW_1), (0, WINDOW_0)])
def test_runtime_cache_follows_the_hand_worked_trace(window, expected):
    assert _cache_misses(TRACE, window) == expected


@pytest.mark.parametrize("window, expected", [(1, WINDOW_1), (0, WINDOW_0)])
def test_simulator_follows_the_hand_worked_trace(window, expected):
    misses = simulate_layer([np.array(p) for p in TRACE], n_hot=0, capacity=2, policy="lfu", window=window)
    assert [m.tolist() for m in misses] == expected


# frequency (decayed use counts), window 0, two slots: 0 is used three times, then 1 once. At t4 the
# victim is 1 (rate 0.98 against 0's 2.94 x 0.98^2 = 2.82), where LRU would evict 0 (last used at t2)
FREQ_TRACE = [[0], [0], [0], [1], [2], [0]]
FREQ_EXPECTED = {"frequency": [[0], [], [], [1], [2], []], "lru": [[0], [], [], [1], [2], [0]]}


@pytest.mark.parametrize("policy", ["frequency", "lru"])
def test_frequency_keeps_the_often_used_neuron_in_cache_and_simulator(policy):
    assert _cache_misses(FREQ_TRACE, 0, policy) == FREQ_EXPECTED[policy]
    misses = simulate_layer([np.array(p) for p in FREQ_TRACE], n_hot=0, capacity=2, policy=policy, window=0)
    assert [m.tolist() for m in misses] == FREQ_EXPECTED[policy]


def test_a_rarely_used_neuron_read_once_is_not_protected_by_the_window():
    """FREQ_TRACE with a window of one token: neuron 1, read at t3 with no uses before, is on probation,
    so at t4 it goes (though t3, in the window, used it) rather than 0 (used three times, outside the
    window): t5 hits 0, in the runtime's cache and in the simulator (the same rule)."""
    expected = [[0], [], [], [1], [2], []]
    assert _cache_misses(FREQ_TRACE, 1, "frequency") == expected
    misses = simulate_layer([np.array(p) for p in FREQ_TRACE], n_hot=0, capacity=2, policy="frequency", window=1)
    assert [m.tolist() for m in misses] == expected
    assert _cache_misses(FREQ_TRACE, 1, "lfu") == [[0], [], [], [1], [2], [0]]  # no probation: the window holds 1


def test_window_k_protects_the_k_tokens_before_the_current_one():
    # tokens 1..3 use {0, 1}, {2}, {3}; at token 4 with window 2, tokens 2 and 3 are in the window
    cache = NeuronCache(neurons=8, capacity=8, bundle_len=1, dtype=np.float32, window=2, policy="lru")
    for need in ([0, 1], [2], [3]):
        cache.tick()
        slots = cache.reserve(len(need))
        cache.commit(slots, np.array(need))
    cache.tick()  # token 4 begins
    assert sorted(cache.position_of[cache.evictable()].tolist()) == [0, 1]
    # the eager `window` policy keeps exactly the same neurons: it drops 0 and 1 when token 4 begins
    eager = NeuronCache(neurons=8, capacity=8, bundle_len=1, dtype=np.float32, window=2, policy="window")
    for need in ([0, 1], [2], [3]):
        eager.tick()
        eager.commit(eager.reserve(len(need)), np.array(need))
    eager.tick()
    assert sorted(eager.position_of[eager.position_of >= 0].tolist()) == [2, 3]


def test_the_simulator_refuses_a_policy_it_cannot_replay():
    with pytest.raises(ValueError, match="predicted"):  # a trace holds no predictor scores
        simulate_layer([np.array([0])], n_hot=0, capacity=2, policy="predicted")


# The window yields to the step itself: two slots, window 2, every cached neuron in the window when
# t2 needs a third. The window's neurons go then, ranked by the policy (LRU: the oldest), rather than
# the step reading in batches. Worked by hand:
#   t0 miss 0 | t1 miss 1 | t2 needs 2: 0 and 1 both in the window; 0 is older -> miss 2, cache {1, 2}
#   t3 needs 0: 1 and 2 in the window, 1 older -> miss 0, cache {2, 0} | t4 needs 2: hit
FORCED_TRACE = [[0], [1], [2], [0], [2]]
FORCED = [[0], [1], [2], [0], []]


@pytest.mark.parametrize("policy", ["lru", "lfu", "frequency"])
def test_the_window_yields_to_the_steps_own_misses_in_cache_and_simulator(policy):
    assert _cache_misses(FORCED_TRACE, 2, policy) == FORCED
    misses = simulate_layer([np.array(p) for p in FORCED_TRACE], n_hot=0, capacity=2, policy=policy, window=2)
    assert [m.tolist() for m in misses] == FORCED
