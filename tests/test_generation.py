"""Sampling and perplexity against direct computations."""

import math

import torch
import torch.nn.functional as F

from sparseflash.model.generate import Sampling, sample_token
from sparseflash.model.loader import open_dense
from sparseflash.model.perplexity import perplexity


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, Sampling(greedy=False, temperature=1.0, top_p=0.7), gen) for _ in range(300)}
    assert picks == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert sample_token(logits, Sampling(greedy=True), None) == int(logits.argmax())


def test_perplexity_equals_direct_cross_entropy():
    model = open_dense(None)
    t = model.transformer()
    ids = torch.randint(0, 4096, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    r = perplexity(t, ids, ctx=100, batch=2)
    nll = []
    for w in range(3):
        seq = torch.tensor(ids[w * 100 : (w + 1) * 100])
        logits = t(seq[None])[0]
        nll.append(F.cross_entropy(logits[:-1], seq[1:], reduction="sum").item())
    assert r.tokens == 297 and math.isclose(r.ppl, math.exp(sum(nll) / 297), rel_tol=1e-6)
