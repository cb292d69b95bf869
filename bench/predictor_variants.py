"""Predictor variants side by side on one prepared model: rank and training target, measured on
held-out text (the "What the predictor's training and size buy" table of docs/fetchless.md).

    python bench/predictor_variants.py --model CKPT --prepared PREP_DIR --corpus TRAIN.txt.zst \
        --heldout EVAL.txt.zst --ranks 6,16,32 --variants plain,contrib1,contrib0.5 --out F.json

Per layer, the FFN inputs, active masks (the profile's PPL-p% thresholds in PREP_DIR/profile) and
neuron magnitudes of the training and held-out tokens are recorded from a dense forward (the model
is held whole: a small-model tool). Each (rank, variant) trains every layer's predictor with
prepare's schedule on the fit slice (the last 10% of the training tokens tunes the cuts), then
reports neurons selected per token (summed over layers) on the held-out tokens at the cut tuned for
count recall 0.99 and at the cuts tuned to keep 0.99 / 0.98 / 0.95 of the active contribution, with
the contribution share each actually keeps there. With ``--adaptive``, also an adaptive k per token
from the score distribution: each token keeps its highest-scoring neurons until their predicted
probabilities (sigmoid of the logits) sum to q of the token's total, with q tuned on the same slice for
count recall 0.99 (bisection); reported with the count recall each rule reaches on the held-out tokens,
so the fixed cut and the adaptive k are compared at what they actually keep. Variants: ``plain`` (prepare's BCE),
``contribG`` (each active neuron's BCE term weighted by (its magnitude / the mean active magnitude)^G,
clamped at 20).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.params import TrainParams
from sparseflash.layout.predictor import (
    contribution_recall,
    default_rank,
    train_predictor,
    tune_cut,
    tune_miss_cut,
)
from sparseflash.model.loader import open_dense
from sparseflash.model.perplexity import windows
from sparseflash.model.text import corpus_ids


def record(model, tap, seqs):
    c = model.config
    xs, ms, gs = ([[] for _ in range(c.num_layers)] for _ in range(3))

    def hook(layer, x, a):
        xs[layer].append(x.detach().half())
        ms[layer].append(tap.active(layer, a))
        gs[layer].append(tap.magnitude(layer, a).half())

    net = tap.transformer(c, hook)
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            net(seqs[i : i + 8])
    return [(torch.cat(x), torch.cat(m), torch.cat(g)) for x, m, g in zip(xs, ms, gs)]


def train(x, mask, mag, rank, variant):
    """prepare's predictor training (layout/predictor.train_predictor); ``contribG`` weights each active
    entry by (its magnitude / the mean active magnitude)^G, clamped at 20."""
    scale = None
    if variant != "plain":
        gamma = float(variant[len("contrib"):] or 1)
        mean_active = (mag.float() * mask).sum() / mask.sum()
        scale = (mag.float() / mean_active).clamp(max=20) ** gamma
    return train_predictor(x, mask, rank, TrainParams(), pos_scale=scale)[0]


def adaptive_mask(z: torch.Tensor, q: float) -> torch.Tensor:
    """Per token (row), the highest-scoring neurons whose sigmoid probabilities sum to q of the row's total."""
    zs, order = torch.sort(z.float(), dim=1, descending=True)
    cum = torch.cumsum(torch.sigmoid(zs), dim=1)
    k = torch.searchsorted(cum, (q * cum[:, -1:]).contiguous()) + 1  # (tokens, 1): neurons kept per token
    keep_sorted = torch.arange(z.shape[1])[None, :] < k
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def count_recall(selected: torch.Tensor, mask: torch.Tensor) -> float:
    return float((selected & mask).sum()) / max(1, int(mask.sum()))


def tune_adaptive(z: torch.Tensor, mask: torch.Tensor, target: float) -> float:
    """The smallest q (bisection, 30 steps) whose adaptive selection reaches ``target`` count recall."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count_recall(adaptive_mask(z, mid), mask) >= target else (mid, hi)
    return hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prepared", required=True, help="a prepare output folder (its profile's thresholds)")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--tokens", type=int, default=24576)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--ranks", default="0", help="comma-separated; 0: the 2.5%% rule")
    ap.add_argument("--variants", default="plain")
    ap.add_argument("--adaptive", action="store_true", help="also the adaptive k per token (see above)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = open_dense(a.model)
    c = model.config
    tap = NeuronTap(model.weights, [float(t) for t in np.load(f"{a.prepared}/profile/thresholds.npz")["ppl"]])
    rec = record(model, tap, windows(corpus_ids(a.corpus, model.tokenizer, a.tokens), 256, a.tokens))
    val = record(model, tap, windows(corpus_ids(a.heldout, model.tokenizer, a.heldout_tokens), 256,
                                     a.heldout_tokens))
    rows = []
    for rank in (int(r) or default_rank(c.hidden_size, c.intermediate_size, c.ffn_param_count())
                 for r in a.ranks.split(",")):
        for variant in a.variants.split(","):
            t = time.time()
            row = {"rank": rank, "variant": variant, "active": 0.0, "selected_count_0.99": 0.0}
            for l in range(c.num_layers):
                x, m, g = rec[l]
                nt = int(len(x) * 0.1)
                pred = train(x[:-nt], m[:-nt], g[:-nt], rank, variant)
                xv, mv, gv = val[l]
                z = pred.logits(xv)
                row["active"] += float(mv.sum(1).float().mean())
                fixed = z > tune_cut(pred, x[-nt:], m[-nt:], 0.99)
                row["selected_count_0.99"] += float(fixed.sum(1).float().mean())
                if a.adaptive:
                    q = tune_adaptive(pred.logits(x[-nt:].float()), m[-nt:], 0.99)
                    adaptive = adaptive_mask(z, q)
                    for name, sel in (("cut", fixed), ("adaptive", adaptive)):
                        row[f"heldout_recall_{name}"] = row.get(f"heldout_recall_{name}", 0.0) + \
                            count_recall(sel, mv) / c.num_layers
                        row[f"heldout_contrib_{name}"] = row.get(f"heldout_contrib_{name}", 0.0) + \
                            contribution_recall(sel, mv, gv) / c.num_layers
                    row["selected_adaptive_0.99"] = row.get("selected_adaptive_0.99", 0.0) + \
                        float(adaptive.sum(1).float().mean())
                    row.setdefault("adaptive_q", []).append(round(q, 5))
                for share in (0.99, 0.98, 0.95):
                    cut = tune_miss_cut(pred, x[-nt:], m[-nt:], g[-nt:], share)
                    row[f"selected_contrib_{share}"] = row.get(f"selected_contrib_{share}", 0.0) + \
                        float((z > cut).sum(1).float().mean())
                    row[f"kept_contrib_{share}"] = row.get(f"kept_contrib_{share}", 0.0) + \
                        contribution_recall(z > cut, mv, gv) / c.num_layers
            row["seconds"] = time.time() - t
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
