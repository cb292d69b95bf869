"""The predictors' report as text, a brief JSON and a plot (what `sparseflash predictors` prints and
saves), and the --rank argument."""

from __future__ import annotations

from pathlib import Path

from sparseflash.errors import SparseflashError


def plot_report(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for l, (curve, m) in enumerate(zip(report["recall_curves"], report["layers"])):
        line, = ax.plot(curve["sparsity"], curve["recall"], lw=1, label=f"layer {l}")
        ax.plot(m["sparsity_topk"], m["recall_topk"], "o", color=line.get_color(), ms=5)
        ax.plot(m["sparsity_threshold"], m["recall_threshold"], "s", color=line.get_color(), ms=5, mfc="none")
    ax.set(xlabel="prediction sparsity", ylabel="recall (held-out tokens)",
           title="Predictor recall vs prediction sparsity (o top-k, □ threshold)")
    ax.set_xlim(max(0.0, min(m["sparsity_threshold"] for m in report["layers"]) - 0.1), 1.0)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_brief(report: dict) -> dict:
    """The report without its bulky parts (what `predictors --json` prints)."""
    return {k: v for k, v in report.items() if k not in ("recall_curves", "threshold_values")}


def report_text(r: dict, out_dir: str) -> str:
    """A predictor report as a few lines."""
    m, p = r["mean"], r["ppl"]
    lines = [f"predictors -> {out_dir} (rank {m['rank']:.0f}, {r['size_share']:.2%} of FFN values; "
             f"trained in {r['train_seconds']:.1f} s on {r['train_tokens']} tokens)",
             f"  held-out ({r['val_tokens']} tokens), true sparsity {m['true_sparsity']:.1%}",
             f"  top-k:     recall {m['recall_topk']:.4f}, prediction sparsity {m['sparsity_topk']:.1%}",
             f"  threshold: recall {m['recall_threshold']:.4f}, prediction sparsity {m['sparsity_threshold']:.1%}"]
    if r["lookahead_mean"]:
        a = r["lookahead_mean"]
        lines.append(f"  look-ahead: top-k recall {a['recall_topk']:.4f} at {a['sparsity_topk']:.1%}, "
                     f"threshold recall {a['recall_threshold']:.4f} at {a['sparsity_threshold']:.1%}")
    lines.append(f"  perplexity: dense {p['dense']:.3f}, oracle {p['oracle']:.3f}, predicted top-k "
                 f"{p['predicted_topk']:.3f}, predicted threshold {p['predicted_threshold']:.3f} "
                 f"(runtime default: {r['strategy']}, {r['predicted_over_true']:.2f}x the true active count)")
    if r.get("rank_choice"):
        ch = r["rank_choice"]
        lines.append(f"  rank chosen at layer {ch['layer']}: {ch['chosen']} (neurons selected a token at recall "
                     f"{ch['target_recall']:g}, {ch['epochs']} epochs: " + ", ".join(
                         f"rank {t['rank']} {t['selected_per_token']:.1f}" for t in ch["candidates"]) + ")")
    if r.get("miss"):
        lines.append(f"  cost-aware miss cuts (threshold; a cache of {r['miss_share']:.0%} of each layer's neurons): "
                     + ", ".join(
            f"contribution {m['recall']:g}: ppl {m['ppl']:.3f}, reads {m['read_per_token']:.1f} of "
            f"{m['computed_per_token']:.1f} computed neurons a token" for m in r["miss"]))
    return "\n".join(lines)


def parse_ranks(text: str) -> int | tuple[int, ...]:
    """'32' -> 32; '16,32,32' -> one rank per layer."""
    try:
        ranks = tuple(int(r) for r in str(text).split(","))
    except ValueError:
        raise SparseflashError(f"--rank {text!r}: give one integer or one per layer, comma-separated") from None
    return ranks[0] if len(ranks) == 1 else ranks
