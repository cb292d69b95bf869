"""Perplexity of a model on a token stream, in non-overlapping windows of ``ctx`` tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparseflash.errors import SparseflashError
from sparseflash.model.transformer import Transformer


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    ctx: int


def windows(ids: list[int], ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut the first ``max_tokens`` ids into full windows (windows, ctx); a ragged tail is dropped."""
    if ctx < 2:
        raise SparseflashError(f"--ctx must be >= 2 tokens, got {ctx}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise SparseflashError(f"--tokens must be >= 1 (and at least --ctx, {ctx}, for one window), got {max_tokens}")
        ids = ids[:max_tokens]
    count = len(ids) // ctx
    if count == 0:
        raise SparseflashError(f"need at least {ctx} tokens of text for one window, got {len(ids)}")
    return torch.tensor(ids[: count * ctx], dtype=torch.long).view(count, ctx)


def perplexity(
    model: Transformer, ids: list[int], ctx: int = 256, max_tokens: int | None = None, batch: int = 8,
    progress: bool = False,
) -> Perplexity:
    """exp(mean NLL) of next-token prediction inside each window (the first token of a window is context)."""
    if ctx < 2 or ctx > model.config.max_position_embeddings:
        raise SparseflashError(f"--ctx must be in [2, {model.config.max_position_embeddings}], got {ctx}")
    seqs = windows(ids, ctx, max_tokens)
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=seqs.numel(), unit="tok", desc="perplexity", leave=False)
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        logits = model(chunk)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                              reduction="sum")
        if not math.isfinite(float(nll)):
            raise SparseflashError(f"windows {i}-{i + len(chunk) - 1}: the negative log-likelihood is {float(nll)}; "
                                   "the model's weights or config hold NaN/inf values")
        total += float(nll)
        count += chunk[:, 1:].numel()
        if bar is not None:
            bar.update(chunk.numel())
    if bar is not None:
        bar.close()
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(seqs), ctx=ctx)
