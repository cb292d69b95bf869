"""PNG figures of ``sparsity-trend``, in the manner of the Sparsing Law paper's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseflash.eval.lawfit import HINGE_PARAMS, PARAMS, LawFit

_SYMBOL = {"alpha": "α", "A0": "A0", "c": "c", "b": "b", "breakpoint": "x_b", "ratio_at_breakpoint": "A_b",
           "slope_below": "s_below", "slope_above": "s_above"}


def _params_text(fit: dict, names) -> str:
    parts = []
    for k in names:
        err = fit["stderr"].get(k)
        parts.append(f"{_SYMBOL[k]}={fit['params'][k]:.3g}" + (f"±{err:.2g}" if err is not None else ""))
    r2 = fit["r2"]
    return ", ".join(parts) + (f", R²={r2:.4f}" if r2 is not None else "")


def write_trend_plots(out_dir: str | Path, summary: dict) -> list[Path]:
    """trend.png + trend_layers.png (mode tokens) or width_depth.png (mode width-depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    cps = summary["checkpoints"]
    p = summary["params"]
    if summary["mode"] == "width-depth":
        x = np.array([c["width_depth_ratio"] for c in cps])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(x, [c["activation_ratio"] for c in cps], "o", color="tab:blue", label=f"PPL-{p['ppl_p']:g}%")
        grid = np.linspace(x.min(), x.max(), 400)
        fit = summary["fit"]
        hinge = fit["params"]
        dx = grid - hinge["breakpoint"]
        ax.plot(grid, hinge["ratio_at_breakpoint"] + hinge["slope_below"] * np.minimum(dx, 0)
                + hinge["slope_above"] * np.maximum(dx, 0), "-", color="tab:blue",
                label="two-segment fit: " + _params_text(fit, HINGE_PARAMS))
        ax.axvline(hinge["breakpoint"], color="gray", ls=":", label=f"bottleneck {hinge['breakpoint']:.3g}")
        ax.plot(x, [c["activation_ratio_cett"] for c in cps], "s", mfc="none", color="tab:orange",
                label=f"CETT {p['cett_bound']:g}")
        for c in cps:
            ax.annotate(f"{c['layers_count']}x{c['hidden_size']}", (c["width_depth_ratio"], c["activation_ratio"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="width/depth ratio (hidden size / layers)", ylabel="activation ratio",
               title=f"Activation ratio vs width/depth ({summary['activation']})")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the fit text is long
        save(fig, "width_depth.png")
        return paths

    x = np.array([c["tokens_trained"] for c in cps], dtype=np.float64)
    grid = np.geomspace(x.min(), 2 * x.max(), 300)  # a little past the last checkpoint, towards A0
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, fits_key, color, marker, label in (("activation_ratio", "ppl", "tab:blue", "o", f"PPL-{p['ppl_p']:g}%"),
                                                ("activation_ratio_cett", "cett", "tab:orange", "s",
                                                 f"CETT {p['cett_bound']:g}")):
        ax.plot(x, [c[key] for c in cps], marker, color=color, mfc=color if fits_key == "ppl" else "none", label=label)
        for form, fit in summary["fits"][fits_key].items():
            if "error" in fit:
                continue
            main = form == summary["form"]
            if not main and fits_key != "ppl":
                continue
            ax.plot(grid, LawFit.from_dict(fit).predict(grid), "-" if main else "--", color=color, lw=1.6 if main else 0.9,
                    alpha=1.0 if main else 0.6, label=f"{form}: " + _params_text(fit, PARAMS[form]))
            if main and fit["limit_ratio"] is not None:
                ax.axhline(fit["limit_ratio"], color=color, ls=":", lw=0.8)
    unit = summary["fit"]["tokens_unit"]
    ax.set_xscale("log")
    ax.set(xlabel="training tokens", ylabel="activation ratio (1 - sparsity)",
           title=f"Activation ratio vs training tokens ({summary['activation']}; D in units of {unit:.0e} tokens)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    save(fig, "trend.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n_layers = len(cps[0]["layers"])
    for i in range(n_layers):
        ax.plot(x, [c["layers"][i]["activation_ratio"] for c in cps], "-o", ms=3, lw=1, label=f"layer {i}")
    ax.plot(x, [c["activation_ratio"] for c in cps], "k-", lw=2, label="mean over layers")
    ax.set_xscale("log")
    ax.set(xlabel="training tokens", ylabel="activation ratio (PPL-p%)", title="Per-layer activation ratio")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "trend_layers.png")
    return paths
