"""The quality gate of ``prepare``: the predicted mode is kept only if it holds the quality bound.

The predictors step measures perplexity on held-out text with each FFN computing only the predicted
neurons, for both strategies (``predicted_topk``, ``predicted_threshold``; layout/predictors_build.py).
The gate keeps the threshold strategy when prepare validated cost-aware miss cuts for it and its rise
over dense is within ``max_rise_pct`` (its miss cuts read far less than top-k), otherwise the
predictors' own choice (the lower perplexity) when within it, else the other strategy if that one is
within it, else falls back to exact streaming (strategy ``all``:
every neuron, the dense model's output). The decision is one line in `prepare`'s log and is
recorded in the layout header (``predictors.gate``), where `run` and `inspect` show it and the runtime
takes its default strategy from it. A model whose PPL-p% sparsity is below ``min_sparsity`` is
reported as too dense to gain, with the numbers.
"""

from __future__ import annotations

import math

from sparseflash.layout.schema import STRATEGIES
from sparseflash.layout.schema_gate import kept_cut


def _rise(ppl: float, dense: float) -> float:
    """Perplexity rise over dense, in percent."""
    return 100.0 * (ppl / dense - 1.0)


def decide_gate(predictors_report: dict, profile: dict, max_rise_pct: float, min_sparsity: float,
                heldout_hash: str | None = None) -> dict:
    """The gate's decision (JSON-ready): ``strategy`` (topk | threshold | all), the bound, the
    measured perplexities and rises, the predicted share of neurons, ``fallback`` (True when the
    predictors' own choice was not kept), ``too_dense`` and the numbers it rests on; ``heldout_hash``
    (paths.file_hash of the held-out text it validated on) lets io-report leave those tokens out."""
    ppl = predictors_report["ppl"]
    dense = float(ppl["dense"])
    mean = predictors_report.get("mean", {})
    own = predictors_report["strategy"]
    measured = {s: float(ppl[f"predicted_{s}"]) for s in STRATEGIES if f"predicted_{s}" in ppl}
    # the threshold strategy first where its cost-aware cuts were validated (they read far less than top-k
    # within the same bound: docs/fetchless.md), else the predictors' own (the lower perplexity)
    first = "threshold" if predictors_report.get("miss") and "threshold" in measured else own
    order = [first] + [s for s in STRATEGIES if s != first and s in measured]
    chosen = next((s for s in order if s in measured and _rise(measured[s], dense) <= max_rise_pct), "all")
    sparsity = float(profile.get("ppl_p_sparsity", 0.0))
    # cost-aware selection: the sparsest miss cut whose nothing-cached perplexity is within the bound
    # (measured for the threshold strategy; none when another strategy is in force)
    miss = predictors_report.get("miss") or []
    def validated(m) -> float:
        """A cost-aware candidate's rise one standard error above the measured one (the measured rise in
        reports from before that was recorded)."""
        return float(m["rise_upper_pct"]) if "rise_upper_pct" in m else _rise(float(m["ppl"]), dense)

    def sparsest(runs):  # (rise per candidate, the sparsest candidate within the bound or None)
        rise = {f"{m['recall']:g}": validated(m) for m in runs}
        ok = [float(m["recall"]) for m in runs if rise[f"{m['recall']:g}"] <= max_rise_pct]
        return rise, min(ok, default=None) if chosen == "threshold" else None

    mixes = {float(e["share"]): e.get("mixes", []) for e in predictors_report.get("miss_mixes") or []}

    def per_layer(share, runs, recall):  # a validated per-layer mix within the bound that reads less, or None
        uniform = next((float(m["read_per_token"]) for m in runs if recall is not None and m["recall"] == recall
                        and "read_per_token" in m), math.inf)
        ok = [m for m in mixes.get(share, []) if "ppl" in m and validated(m) <= max_rise_pct
              and float(m["read_per_token"]) < uniform]
        best = min(ok, key=lambda m: float(m["read_per_token"])) if ok and chosen == "threshold" else None
        return ({"miss_layer_recalls": None} if best is None else
                {"miss_layer_recalls": [float(r) for r in best["recalls"]],
                 "miss_layer_rise_pct": validated(best)})

    miss_rise, miss_recall = sparsest(miss)
    share = float(predictors_report.get("miss_share", 0.0))
    mixed = per_layer(share, miss, miss_recall) if mixes else {}
    larger = []  # the same choice with each larger validated cache
    for entry in predictors_report.get("miss_larger") or []:
        rise, recall = sparsest(entry["miss"])
        larger.append({"share": float(entry["share"]), "miss_rise_pct": rise, "miss_recall": recall,
                       **(per_layer(float(entry["share"]), entry["miss"], recall) if mixes else {})})
    return {
        "strategy": chosen,
        "own_strategy": own,
        "fallback": chosen != first,
        "max_rise_pct": float(max_rise_pct),
        "ppl_dense": dense,
        "ppl": measured,
        "rise_pct": {s: _rise(v, dense) for s, v in measured.items()},
        "predicted_share": {s: 1.0 - float(mean[f"sparsity_{s}"]) for s in measured if f"sparsity_{s}" in mean},
        "heldout_tokens": int(predictors_report.get("val_tokens", 0)),
        **({"heldout_hash": heldout_hash} if heldout_hash else {}),
        "ppl_p": float(profile.get("ppl_p", 0.0)),
        "ppl_p_sparsity": sparsity,
        "min_sparsity": float(min_sparsity),
        "too_dense": sparsity < min_sparsity,
        "miss_recalls": [float(m["recall"]) for m in miss],
        "miss_rise_pct": miss_rise,
        "miss_recall": miss_recall,
        "miss_share": share,
        **mixed,
        **({"cached_share": float(predictors_report["cached_share"])} if "cached_share" in predictors_report else {}),
        **({"miss_larger": larger} if larger else {}),
    }


def gate_line(gate: dict) -> str:
    """The decision as one line (prepare's log; `run` and `inspect` show the same)."""
    rises = ", ".join(f"{s} {gate['rise_pct'][s]:+.2f}%" for s in gate["rise_pct"])
    share = gate["predicted_share"].get(gate["strategy"])
    kept = (f"kept {gate['strategy']}" if not gate["fallback"] else
            f"FALLBACK to {gate['strategy']}" + (" (every neuron streamed: exact, no sparsity gain)"
                                                  if gate["strategy"] == "all" else ""))
    line = (f"quality gate: {kept}; held-out ppl vs dense {gate['ppl_dense']:.3f}: {rises} "
            f"(bound +{gate['max_rise_pct']:g}%)" + (f", predicts {share:.1%} of neurons" if share is not None else ""))
    kept = kept_cut(gate)
    if kept is not None:
        which = "its layer's cut, keeping" if gate.get("miss_layer_recalls") else "the cut keeping"
        line += (f"; cost-aware: a neuron not in memory is read only above {which} {kept[0]} of the active "
                 f"contribution" + (f", one in memory is computed down to the cut keeping {gate['cached_share']:g}"
                                    if "cached_share" in gate else "")
                 + f" ({kept[1]:+.2f}% with {gate['miss_share']:.0%} of the FFN neurons in memory; "
                 "applied where a run's cache is at least that large)")
    elif gate.get("miss_recalls") and gate["strategy"] == "threshold":
        line += "; cost-aware: no miss cut within the bound"
    for entry in gate.get("miss_larger", []):
        kept = kept_cut(entry)
        if kept is not None:
            which = "per-layer cuts keeping" if entry.get("miss_layer_recalls") else "the cut keeping"
            line += f"; with {entry['share']:.0%} of the FFN neurons in memory: {which} {kept[0]} ({kept[1]:+.2f}%)"
    if gate["too_dense"]:
        line += (f"; model too dense to gain: PPL-{gate['ppl_p']:g}% sparsity {gate['ppl_p_sparsity']:.1%} "
                 f"< {gate['min_sparsity']:.0%}")
    return line
