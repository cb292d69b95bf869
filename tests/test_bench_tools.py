"""Helpers of the bench scripts that decide what a reported figure means."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from predictor_variants import adaptive_mask, count_recall, tune_adaptive  # noqa: E402


def test_adaptive_k_keeps_the_top_scores_up_to_a_share_of_the_probability_mass():
    z = torch.tensor([[3.0, -2.0, 0.5, 1.0], [-5.0, -5.0, 4.0, -1.0]])
    # row 0: sigmoid 0.953, 0.119, 0.622, 0.731 (total 2.425): half the mass is the two best scores
    assert adaptive_mask(z, 0.5).tolist() == [[True, False, False, True], [False, False, True, False]]
    assert adaptive_mask(z, 0.0).sum(1).tolist() == [1, 1]  # at least the best neuron of each token
    assert adaptive_mask(z, 0.999).all()


def test_adaptive_q_is_the_smallest_that_reaches_the_recall():
    torch.manual_seed(0)
    z = torch.randn(64, 50)
    mask = z + 0.5 * torch.randn(64, 50) > 1.0
    q = tune_adaptive(z, mask, 0.9)
    assert count_recall(adaptive_mask(z, q), mask) >= 0.9
    assert count_recall(adaptive_mask(z, q - 1e-3), mask) < 0.9 or q < 1e-3


def test_text_splits_share_no_line_and_lose_none():
    from split_text import split_lines

    text = "".join(f"line {i}\n" for i in range(10)) + "last, no newline"
    held, ev = split_lines(text, None)
    assert held + ev == text and held.count("\n") == 5  # halves of the 11 lines, in order
    held, ev = split_lines(text, 3)
    assert held.splitlines() == ["line 0", "line 1", "line 2", "line 6", "line 7", "line 8"]
    assert ev.splitlines() == ["line 3", "line 4", "line 5", "line 9", "last, no newline"]
