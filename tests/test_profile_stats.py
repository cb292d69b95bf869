"""Profiling metrics against direct numpy computations, edge cases included."""

import numpy as np
import pytest
import torch

from sparseflash.layout import stats
from sparseflash.layout.coactivation import (
    _pair_kernel,
    accumulate_coactivation,
    active_lists,
    coactivation_stats,
)
from sparseflash.layout.masks import MaskWriter, load_masks, pack, unpack


def relu2_acts(tokens, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(tokens, n, generator=g) - 0.8) ** 2
    w_down = torch.randn(d, n, generator=g) / np.sqrt(n)
    return a, w_down


def test_token_cett_equals_direct_sum_of_inactive_outputs():
    a, w = relu2_acts(20, 50, 16)
    mag = a.abs() * torch.linalg.vector_norm(w, dim=0)
    t = float(mag[mag > 0].median())
    ours = stats.token_cett(a, mag, w, t).numpy()
    an, wn, mn = a.double().numpy(), w.double().numpy(), mag.double().numpy()
    for i in range(20):
        inactive = [j for j in range(50) if not (mn[i, j] >= t and mn[i, j] > 0)]
        trunc = sum((an[i, j] * wn[:, j] for j in inactive), np.zeros(16))
        full = wn @ an[i]
        expected = np.linalg.norm(trunc) / np.linalg.norm(full) if np.linalg.norm(full) > 0 else 0.0
        assert ours[i] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_threshold_search_picks_the_largest_candidate_within_the_bound():
    a, w = relu2_acts(200, 64, 32, seed=1)
    search = stats.CettSearch(a, w, candidates=200)
    for bound in (0.0, 0.05, 0.2, 0.5):
        t, cett = search.threshold_for(bound)
        k = int(np.searchsorted(search.candidates, t))
        assert cett <= bound and cett == pytest.approx(search.mean_cett(t))
        if k + 1 < len(search.candidates):
            assert search.mean_cett(float(search.candidates[k + 1])) > bound
        brute = [c for c in search.candidates if search.mean_cett(float(c)) <= bound]
        assert t == max(brute)  # the mean CETT of this data is monotone in the threshold


def test_threshold_search_edge_cases():
    _, w = relu2_acts(10, 32, 8)
    silent = stats.CettSearch(torch.zeros(10, 32), w)
    t, cett = silent.threshold_for(0.2)
    assert cett == 0.0 and silent.sparsity_at(t) == 1.0
    dense = torch.rand(10, 32) + 0.1
    everything = stats.CettSearch(dense, w)
    t, cett = everything.threshold_for(0.0)
    assert cett == 0.0 and everything.sparsity_at(t) == 0.0  # nothing truncated
    t, _ = everything.threshold_for(1.0)
    assert everything.sparsity_at(t) > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cett_curve_equals_the_dense_search_within_its_stated_tolerance(seed):
    """The fast search (CettCurve: one sweep for every candidate) against the exact reference
    (CettSearch: a dense product per candidate). Stated tolerance: mean CETT within 1e-6 at every
    candidate; thresholds equal unless the dense mean CETT of the two neighbouring candidates
    brackets the bound within 1e-6."""
    a, w = relu2_acts(400, 96, 48, seed=seed)
    a[:, 3] = 0
    w[:, 5] = 0  # a dead down column: its neurons are never active
    exact = stats.CettSearch(a, w, candidates=300)
    fast = stats.CettCurve(a, w, candidates=300)
    assert np.array_equal(fast.candidates, exact.candidates)
    dense = np.array([exact.mean_cett(float(c)) for c in exact.candidates])
    assert np.abs(fast.curve - dense).max() <= 1e-6
    for bound in (0.0, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.9):
        t_fast, c_fast = fast.threshold_for(bound)
        t_exact, _ = exact.threshold_for(bound)
        if t_fast != t_exact:
            k = int(np.searchsorted(exact.candidates, min(t_fast, t_exact)))
            assert abs(dense[k + 1] - bound) <= 1e-6 or abs(dense[k] - bound) <= 1e-6
        assert c_fast <= bound
        assert fast.sparsity_at(t_fast) == pytest.approx(exact.sparsity_at(t_fast), abs=1e-6)  # f32 mean


def test_cett_curve_reads_bf16_down_rows_as_stored_with_the_same_result():
    """W_down stored in bfloat16 is swept from its 16-bit rows (half the bytes): widening is exact,
    so the curve and active counts equal, bit for bit, those from the float32 copy."""
    a, w = relu2_acts(300, 80, 40, seed=3)
    w16 = w.to(torch.bfloat16)
    half = stats.CettCurve(a, w16, candidates=200)
    full = stats.CettCurve(a, w16.float(), candidates=200)
    assert np.array_equal(half.curve, full.curve) and np.array_equal(half.active, full.active)
    assert not np.array_equal(half.curve, stats.CettCurve(a, w, candidates=200).curve)  # the rounding is seen


def direct_reuse(mask, k):
    ratios = []
    for t in range(k, len(mask)):
        now = set(np.nonzero(mask[t])[0])
        if not now:
            continue
        before = set()
        for j in range(1, k + 1):
            before |= set(np.nonzero(mask[t - j])[0])
        ratios.append(len(now & before) / len(now))
    return ratios


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_reuse_ratios_equal_direct_computation(density):
    rng = np.random.default_rng(0)
    mask = rng.random((40, 37)) < density
    sums, counts = stats.reuse_ratios(pack(mask))
    for k in stats.REUSE_WINDOWS:
        expected = direct_reuse(mask, k)
        assert counts[k] == len(expected)
        assert sums[k] == pytest.approx(sum(expected))


def test_reuse_ratio_on_a_sequence_shorter_than_the_window():
    sums, counts = stats.reuse_ratios(pack(np.ones((5, 9), bool)))
    assert counts[16] == 0 and counts[4] == 1 and sums[1] == 4.0


@pytest.mark.parametrize("path", ["pairs", "gemm"])
def test_coactivation_counts_equal_mask_product(path, monkeypatch):
    rng = np.random.default_rng(1)
    mask = rng.random((300, 45)) < 0.2
    counts = np.zeros((45, 45), dtype=np.int64)
    import sparseflash.layout.coactivation as co

    monkeypatch.setattr(co, "_PAIR_COST_IN_GEMM_OPS", 0.0 if path == "pairs" else 1e12)
    accumulate_coactivation(pack(mask), 45, counts)
    m = mask.astype(np.int64)
    assert np.array_equal(counts, m.T @ m)


@pytest.mark.parametrize("path", ["pairs", "gemm"])
@pytest.mark.parametrize("block_rows", [None, 7])
def test_coactivation_stats_by_row_blocks_equal_the_full_table(path, block_rows, monkeypatch):
    import sparseflash.layout.coactivation as co

    rng = np.random.default_rng(4)
    mask = rng.random((500, 61)) < 0.2
    mask[:, 9] = False  # never active: left out of the gap
    monkeypatch.setattr(co, "_PAIR_COST_IN_GEMM_OPS", 0.0 if path == "pairs" else 1e12)
    full = mask.astype(np.int64).T @ mask.astype(np.int64)
    block_bytes = 1 << 30 if block_rows is None else 24 * 61 * block_rows
    got = coactivation_stats(pack(mask), 61, 8, keep_full=block_rows is None, block_bytes=block_bytes)
    idx, cnt = stats.top_neighbors(full, 8)
    assert np.array_equal(got.neighbors, idx) and np.array_equal(got.neighbor_counts, cnt)
    assert got.gap == pytest.approx(stats.coactivation_gap(full), abs=1e-12)
    assert (got.counts is None) == (block_rows is not None)
    if got.counts is not None:
        assert got.counts.dtype == np.int32 and np.array_equal(got.counts, full)


def test_pair_kernel_handles_empty_rows():
    counts = np.zeros((10, 10), dtype=np.int64)
    mask = np.zeros((3, 10), bool)
    mask[1, [2, 7]] = True
    indptr, indices = active_lists(pack(mask), 10)
    assert indptr.tolist() == [0, 0, 2, 2] and indices.tolist() == [2, 7]
    _pair_kernel()(indptr, indices, counts, 0, 10, 3)  # three threads: rows 0-2, 3-5, 6-9
    assert counts.sum() == 4 and counts[2, 7] == counts[7, 2] == counts[2, 2] == 1
    block = np.zeros((5, 10), dtype=np.int64)  # rows 5..9 only, split over two threads
    _pair_kernel()(indptr, indices, block, 5, 10, 2)
    assert block.sum() == 2 and block[2, 2] == block[2, 7] == 1


def test_coactivation_gap_equals_direct_loops():
    rng = np.random.default_rng(2)
    m = (rng.random((100, 12)) < 0.3).astype(np.int64)
    m[:, 5] = 0  # a neuron that never fires is left out
    c = m.T @ m
    rows = [i for i in range(12) if c[i, i] > 0]
    tops, allp = [], []
    for i in rows:
        ps = [c[i, j] / c[i, i] for j in range(12) if j != i]
        tops.append(max(ps))
        allp += ps
    assert stats.coactivation_gap(c) == pytest.approx(np.mean(tops) - np.mean(allp))
    assert stats.coactivation_gap(np.zeros((4, 4), dtype=np.int64)) == 0.0


def test_hot_cdf_equals_direct_computation():
    freq = np.array([5, 0, 1, 10, 4, 0, 0, 0, 0, 0])
    cdf = stats.hot_cdf(freq)
    assert cdf[0] == 0 and cdf[-1] == pytest.approx(1.0)
    assert cdf[10] == pytest.approx(10 / 20)  # top 10% = 1 neuron
    assert cdf[30] == pytest.approx(19 / 20)
    assert np.all(np.diff(cdf) >= 0)
    assert np.all(stats.hot_cdf(np.zeros(7)) == 0)


def test_top_neighbors_are_the_largest_off_diagonal_counts():
    c = np.array([[9, 1, 5, 3], [1, 8, 2, 7], [5, 2, 6, 0], [3, 7, 0, 4]])
    idx, cnt = stats.top_neighbors(c, 2)
    assert idx.tolist() == [[2, 3], [3, 2], [0, 1], [1, 0]]
    assert cnt.tolist() == [[5, 3], [7, 2], [5, 2], [7, 3]]


def test_mask_files_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mask = rng.random((1000, 77)) < 0.1
    w = MaskWriter(tmp_path / "m.bits.zst", 77)
    for i in range(0, 1000, 300):
        w.write(pack(mask[i : i + 300]))
    w.close()
    assert np.array_equal(unpack(load_masks(tmp_path / "m.bits.zst", 77, 1000), 77), mask)
    from sparseflash.errors import ArtefactError

    with pytest.raises(ArtefactError, match="expected 999"):
        load_masks(tmp_path / "m.bits.zst", 77, 999)


def test_count_true_equals_torch_sums_without_widening_the_mask():
    import torch

    from sparseflash.layout.masks import count_true

    m = torch.rand(300, 70, generator=torch.Generator().manual_seed(0)) < 0.1
    assert count_true(m) == int(m.sum()) and count_true(m.numpy()) == int(m.sum())
    for dim in (0, 1):
        got = count_true(m, dim)
        assert got.dtype == torch.int64 and torch.equal(got, m.sum(dim))
    assert torch.equal(count_true(m[100:], 0), m[100:].sum(0))  # a row slice (a view) as training passes it
    assert count_true(torch.zeros(0, 5, dtype=torch.bool)) == 0
