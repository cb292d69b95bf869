"""PNG figures of a profile, in the manner of the ReLU² Wins / Sparsing Law papers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(out_dir: str | Path, summary: dict) -> list[Path]:
    """sparsity_vs_cett.png, reuse_vs_activation.png, coact_gap.png, hot_cdf.png, ppl_search.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    layers = summary["layers"]
    paths = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = summary["sparsity_vs_cett"]
    bounds = sorted(curve, key=float)
    xs = [float(b) for b in bounds]
    for i in range(len(layers)):
        ax.plot(xs, [curve[b][i] for b in bounds], lw=0.8, alpha=0.6)
    ax.plot(xs, [float(np.mean(curve[b])) for b in bounds], "k-o", lw=2, label="mean over layers")
    ax.axvline(summary["cett_bound"], color="gray", ls="--", label=f"CETT bound {summary['cett_bound']}")
    ax.axvline(summary["ppl_bound"], color="tab:red", ls=":", label=f"PPL+{summary['ppl_p']}% bound")
    ax.set(xlabel="CETT bound", ylabel="sparsity", title="Sparsity vs CETT (threshold sample)")
    ax.legend(fontsize=8)
    save(fig, "sparsity_vs_cett.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    act = [e["activation_ratio"] for e in layers]
    for k in summary["reuse"]:
        ax.scatter(act, [e["reuse"][k] or 0 for e in layers], label=f"k={k}", s=18)
    ax.set(xlabel="activation ratio (layer)", ylabel="reuse ratio", title="Reuse ratio vs activation ratio")
    ax.legend(fontsize=8, ncol=2)
    save(fig, "reuse_vs_activation.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(layers)), [e["coact_gap"] for e in layers])
    ax.set(xlabel="layer", ylabel="top-average co-activation gap", title="Co-activation gap per layer")
    save(fig, "coact_gap.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    npz = sorted(out_dir.glob("layer_*.npz"))
    for i, path in enumerate(npz):
        cdf = np.load(path)["cett_hot_cdf"]
        ax.plot(np.linspace(0, 100, len(cdf)), cdf, lw=1, label=f"layer {i}" if len(npz) <= 12 else None)
    ax.plot([0, 100], [0, 1], "k:", lw=0.8, label="uniform")
    ax.set(xlabel="% most frequent neurons", ylabel="share of activations", title="Hot-neuron CDF")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "hot_cdf.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    trials = sorted(summary["ppl_search"], key=lambda t: t["bound"])
    ax.plot([t["bound"] for t in trials], [t["ppl"] for t in trials], "o-")
    ax.axhline(summary["ppl_dense"] * (1 + summary["ppl_p"] / 100), color="tab:red", ls=":",
               label=f"dense +{summary['ppl_p']}%")
    ax.axhline(summary["ppl_dense"], color="gray", ls="--", label="dense")
    ax.set(xlabel="common CETT bound", ylabel="held-out perplexity", title="PPL-p% search", yscale="log")
    ax.legend(fontsize=8)
    save(fig, "ppl_search.png")
    return paths
