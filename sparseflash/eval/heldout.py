"""Which held-out tokens an evaluation reads: not those the layout's quality gate chose its cuts on.

``prepare`` validates the predicted mode and its miss cuts on the first ``heldout_tokens`` of its held-out
text and records that text's hash in the gate (``header.predictors.gate.heldout_hash``). An io-report on
the same text over the same tokens measures the cuts on the text they were fitted to, which flatters them
(docs/figures.md, "Held-out tokens"). By default io-report therefore starts after them on that text.
"""

from __future__ import annotations

import os

from sparseflash.errors import SparseflashError
from sparseflash.model.checkpoint import file_hash
from sparseflash.model.text import corpus_ids


def gate_tokens(gate: dict | None, corpus: str | os.PathLike) -> int:
    """How many leading tokens of ``corpus`` the gate validated on: its ``heldout_tokens`` when the gate
    recorded ``corpus``'s hash, else 0 (another text, or a layout from before the hash was recorded)."""
    if not gate or "heldout_hash" not in gate:
        return 0
    return int(gate["heldout_tokens"]) if file_hash(corpus) == gate["heldout_hash"] else 0


def eval_ids(corpus: str | os.PathLike, tokenizer, tokens: int, ctx: int, skip: int | None,
             gate: dict | None) -> tuple[list[int], int, str | None]:
    """(ids, skipped, note): up to ``tokens`` ids of ``corpus`` after the first ``skip`` (None: the
    gate's validated tokens when ``corpus`` is its held-out text, ``gate_tokens``), and a one-line note
    when tokens were left out for that reason. At least one window of ``ctx`` must remain."""
    if skip is not None and skip < 0:
        raise SparseflashError(f"--skip must be >= 0 tokens, got {skip}")
    auto = skip is None
    if auto:
        skip = gate_tokens(gate, corpus)
    ids = corpus_ids(corpus, tokenizer, skip + tokens)
    left = ids[skip: skip + tokens]
    if len(left) < ctx:
        raise SparseflashError(f"{corpus} has {len(ids)} tokens: after the first {skip} skipped, fewer than one "
                               f"window of {ctx} remain" + (" (the quality gate's; pass --skip 0 to use them)"
                                                            if auto else ""))
    note = (f"io-report: leaving out the first {skip} tokens of {corpus}: the layout's quality gate chose its "
            f"cuts on them (--skip 0 keeps them)") if auto and skip else None
    return left, skip, note
