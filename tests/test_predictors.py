"""Predictor training, metrics and persistence."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseflash.layout.params import PredictorParams
from sparseflash.layout.predictor import (
    Predictor,
    TrainParams,
    bce_logits_grad,
    recall_and_sparsity,
    train_predictor,
    tune_cut,
)
from sparseflash.layout.predictors_build import _save_weights, _train_side_by_side, load_predictors


def synthetic(tokens=6000, d=32, n=96, seed=0):
    """Masks that are a known low-rank function of x: neuron i fires when (x @ V)[i] > 1.2."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, 6, generator=g) @ torch.randn(6, n, generator=g) / 3
    x = torch.randn(tokens, d, generator=g)
    return x, (x @ v) > 1.2


def test_training_learns_a_known_mask_function():
    x, mask = synthetic()
    pred, log = train_predictor(x[:5000], mask[:5000], rank=12, params=TrainParams(epochs=15, batch=256))
    assert log["train_loss"][-1] < 0.5 * log["train_loss"][0]
    pred.cut = tune_cut(pred, x[4000:5000], mask[4000:5000], 0.99)
    recall, sparsity = recall_and_sparsity(pred.predict_threshold(x[5000:]), mask[5000:])
    assert recall > 0.95 and sparsity > 0.5


def test_the_validation_loss_taken_a_batch_at_a_time_is_the_loss_over_all_held_out_rows():
    x, mask = synthetic(tokens=1300)
    p = TrainParams(epochs=2, batch=256)  # 300 held-out rows: one full batch and a short one
    pred, log = train_predictor(x[:1000], mask[:1000], rank=6, params=p, x_val=x[1000:], mask_val=mask[1000:])
    rate = mask[:1000].float().mean()
    pos_weight = torch.clamp((1 - rate) / rate, max=p.max_pos_weight)
    whole = F.binary_cross_entropy_with_logits(pred.logits(x[1000:]), mask[1000:].float(), pos_weight=pos_weight)
    assert len(log["val_loss"]) == 2 and abs(log["val_loss"][-1] - float(whole)) < 1e-5


def test_trainings_side_by_side_equal_trainings_one_after_the_other():
    (x1, m1), (x2, m2) = synthetic(2000, seed=1), synthetic(2000, seed=2)
    threads = torch.get_num_threads()
    runs = {}
    for jobs in (1, 2):
        p = PredictorParams(train=TrainParams(epochs=3, batch=256), train_jobs=jobs)
        seen = []
        runs[jobs] = _train_side_by_side([(x1.half(), m1), (x2.half(), m2)], 8, p, lambda j, e, total, seen=seen: seen.append((j, e)))
        assert sorted(seen) == [(j, e) for j in (0, 1) for e in (1, 2, 3)]  # every epoch of both reported
        assert torch.get_num_threads() == threads  # the intra-op threads are given back
    for (a, log_a), (b, log_b) in zip(runs[1], runs[2]):
        for name in ("w1", "b1", "w2", "b2"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert log_a["train_loss"] == log_b["train_loss"]
    assert not torch.equal(runs[2][0][0].w2, runs[2][1][0].w2)  # two different jobs, two different predictors


@pytest.mark.parametrize("pos_weight", [1.0, 7.5, 30.0])
def test_closed_form_loss_gradient_equals_autograd(pos_weight):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(64, 40, generator=g) * 6).requires_grad_()
    target = torch.rand(64, 40, generator=g) < 0.1
    pw = torch.tensor(pos_weight)
    F.binary_cross_entropy_with_logits(z, target.float(), pos_weight=pw).backward()
    assert torch.allclose(bce_logits_grad(z, target, pw), z.grad, rtol=1e-5, atol=1e-9)


def test_metrics_equal_direct_numpy():
    rng = np.random.default_rng(0)
    pred = rng.random((50, 30)) < 0.3
    true = rng.random((50, 30)) < 0.2
    recall, sparsity = recall_and_sparsity(pred, true)
    hits = sum(len(set(np.nonzero(p)[0]) & set(np.nonzero(t)[0])) for p, t in zip(pred, true))
    assert recall == pytest.approx(hits / true.sum(), rel=1e-9)
    assert sparsity == pytest.approx(1 - pred.sum() / pred.size, rel=1e-6)
    assert recall_and_sparsity(pred, np.zeros_like(true)) == (1.0, sparsity)


def test_topk_and_threshold_predictions():
    g = torch.Generator().manual_seed(1)
    p = Predictor(torch.randn(4, 8, generator=g), torch.zeros(4), torch.randn(20, 4, generator=g), torch.randn(20, generator=g),
                  topk=5, cut=0.3)
    x = torch.randn(7, 8, generator=g)
    assert (p.predict_topk(x).sum(1) == 5).all()
    z = p.logits(x)
    assert torch.equal(p.predict_threshold(x), z > 0.3)
    assert torch.equal(p.predict_topk(x), z >= torch.topk(z, 5, dim=1).values[:, -1:])


def test_saved_predictors_reload_with_identical_scores(tmp_path):
    x, mask = synthetic(tokens=600)
    pred, _ = train_predictor(x, mask, rank=4, params=TrainParams(epochs=2))
    pred.topk, pred.cut = 7, -0.25
    _save_weights(tmp_path / "predictors.safetensors", {"layer.0": pred}, {"version": 1, "source_hash": "x"})
    loaded, meta = load_predictors(tmp_path)
    again = loaded["layer.0"]
    assert meta["source_hash"] == "x" and again.topk == 7 and again.cut == -0.25
    assert torch.equal(again.logits(x), pred.logits(x))


def test_rank_candidates_double_from_the_size_share_up_to_the_cap():
    from sparseflash.layout.predictor_training import rank_candidates

    p = PredictorParams(size_share=0.025, max_size_share=0.1)
    # d 256, n 1024, 524,288 FFN values: 2.5% -> rank 10, 10% -> rank 40
    assert rank_candidates(256, 1024, 524288, p) == [10, 20, 40]
    assert rank_candidates(128, 344, 132096, p) == [6, 12, 24]  # 10% is rank 27: not well above 24
    assert rank_candidates(256, 1024, 524288, PredictorParams(size_share=0.1, max_size_share=0.1)) == [40]
    # 135M shape: 2.5% is rank 31, capped at rank 64 -> one doubling; 7B: 2.5% is rank 223, nothing to try
    assert rank_candidates(576, 1536, 3 * 576 * 1536, p) == [31, 62]
    assert rank_candidates(4096, 11008, 3 * 4096 * 11008, p) == [223]


def test_the_rank_choice_takes_the_smallest_rank_near_the_fewest_selected():
    """Masks of rank 6: rank 1 cannot separate the neurons, rank 6 and 12 can; the choice keeps the
    smallest rank whose selection at the target recall is within the tolerance of the best."""
    from sparseflash.layout.predictor_training import _choose_rank

    x, mask = synthetic(tokens=4000)
    p = PredictorParams(rank_epochs=6, rank_tolerance=0.1, target_recall=0.9, train=TrainParams(batch=256))
    chosen, table = _choose_rank(x, mask, [1, 6, 12], p)
    sel = {t["rank"]: t["selected_per_token"] for t in table}
    assert sel[1] > 1.2 * sel[6]  # too small a predictor over-selects
    fewest = min(sel.values())
    assert chosen == min(r for r, s in sel.items() if s <= 1.1 * fewest) and chosen > 1


def test_a_positive_scale_of_one_is_plain_training_and_other_scales_move_only_the_active_terms():
    x, mask = synthetic(tokens=1200)
    p = TrainParams(epochs=2, batch=256)
    plain, _ = train_predictor(x, mask, 4, p)
    ones, _ = train_predictor(x, mask, 4, p, pos_scale=torch.ones(mask.shape))
    assert all(torch.equal(getattr(plain, k), getattr(ones, k)) for k in ("w1", "b1", "w2", "b2"))
    inactive_only = torch.where(mask, 1.0, 5.0)  # scales where nothing is active: no effect either
    same, _ = train_predictor(x, mask, 4, p, pos_scale=inactive_only)
    assert torch.equal(plain.w2, same.w2)
    heavier, _ = train_predictor(x, mask, 4, p, pos_scale=torch.where(mask, 3.0, 1.0))
    assert not torch.equal(plain.w2, heavier.w2)
