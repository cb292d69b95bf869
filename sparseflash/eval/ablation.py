"""``sparseflash io-report --ablation``: which change buys what, measured in one run.

Teacher-forced on the same held-out tokens, at each FFN budget, the streamed engine runs once per
variant (``VARIANTS``): every prediction read, then the miss cut that prepare's quality gate
validated (cost-aware selection: the default run), then look-ahead prefetch (``--lookahead``: first
as sure as the layer's own reads, then with its cuts raised by ``Policy.lookahead_raise``); and, for
comparison, the default run with the frequency eviction's former rule (no probation), with the former
default eviction (``predicted``), with every layer the same cache (the former split: the default splits
the cache among layers by the layout's cache demand), and fixed logit offsets.
Per variant: neurons fetched per token (demand reads + look-ahead reads, used or not), bytes read
per token (the reader's count), perplexity and its rise over dense,
top-1 agreement with dense, and Belady's optimum on the variant's own predicted trace (simulated:
no eviction can fetch fewer neurons for those predictions). The oracle (true active sets + Belady in
the same cache as the default run, the same slots in each layer, simulated) is the floor every row is
divided by; the oracle with every layer the same cache is shown too (the floor before the split).
Next to it, the online
floor: the same true active sets through the runtime's own eviction rules (the default policy and
window, simulated; a runtime that does not know the future cannot evict as Belady does), which is
what a perfect predictor would fetch.
"""

from __future__ import annotations

from sparseflash.eval.io_report import _dense_pass, quality, streamed_pass
from sparseflash.eval.simulate import simulate
from sparseflash.model.perplexity import windows
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import open_layout
from sparseflash.runtime.policy import DEFAULT_EVICTION, Policy

_EV = DEFAULT_EVICTION
_RAISE = Policy.lookahead_raise
# name -> Policy fields; each row adds one change to the row before, but the last four, which change the
# default run's eviction (the former rule, the former policy), its cache split, or replace the miss cut by
# fixed logit offsets, for comparison
VARIANTS = {
    f"window 4 + {_EV}, every prediction read": dict(lookahead=False, eviction=_EV, miss_cut=False,
                                                     cached_bonus=0.0, miss_penalty=0.0),
    "+ validated miss cut (prepare's gate): the default run": dict(lookahead=False, eviction=_EV, miss_cut=True,
                                                                   cached_bonus=0.0, miss_penalty=0.0),
    "+ look-ahead prefetch, as sure as the layer's own reads (--lookahead --lookahead-raise 0)": dict(
        lookahead=True, eviction=_EV, miss_cut=True, cached_bonus=0.0, miss_penalty=0.0, lookahead_raise=0.0),
    f"+ look-ahead cuts {_RAISE:g} logit{'' if _RAISE == 1 else 's'} higher (--lookahead; the default until "
    "2026-12-05)": dict(lookahead=True, eviction=_EV, miss_cut=True, cached_bonus=0.0, miss_penalty=0.0),
    f"the default run, {_EV} eviction without probation (the former rule)": dict(
        lookahead=False, eviction=_EV, miss_cut=True, cached_bonus=0.0, miss_penalty=0.0, probation=False),
    "the default run, predicted eviction (the default until 2026-12-04)": dict(
        lookahead=False, eviction="predicted", miss_cut=True, cached_bonus=0.0, miss_penalty=0.0),
    "the default run, every layer the same cache (the former split)": dict(
        lookahead=False, eviction=_EV, miss_cut=True, cached_bonus=0.0, miss_penalty=0.0, split_cache=False),
    "fixed offsets instead (cached +1, missing -3 logits)": dict(lookahead=False, eviction=_EV,
                                                                 miss_cut=False, cached_bonus=1.0, miss_penalty=3.0),
}


def fetch_ablation(path: str, ids: list[int], tokens: int = 1024, ctx: int = 256,
                   budgets: tuple[str, ...] = ("25%ffn", "50%ffn"), device: DeviceModel | None = None,
                   variants: dict | None = None, quiet: bool = False) -> dict:
    """The ablation table of one layout (see the module docstring); JSON-ready."""
    if device is None:
        from sparseflash.runtime.diskprobe import device_model_for

        device = device_model_for(path)
    variants = VARIANTS if variants is None else variants
    seqs = windows(ids, ctx, tokens)
    n_tok = int(seqs.numel())
    lm = open_layout(path, with_ffn=True)
    try:
        regions = list(lm.file.layers)
        dense_bytes = lm.ffn_bytes
        ref, orc_logits, oracle_trace = _dense_pass(lm, seqs)
    finally:
        lm.close()
    n_hot = [r.n_hot for r in regions]
    bb, gap = regions[0].bundle_bytes, device.merge_gap_blocks
    ppl_dense, _ = quality(ref, seqs, ref)
    ppl_o, top1_o = quality(orc_logits, seqs, ref)
    out = {"layout": str(path), "tokens": n_tok, "ctx": ctx, "ppl_dense": ppl_dense, "dense_bytes": dense_bytes,
           "device_model": device.to_dict(), "budgets": {}}
    for budget in budgets:
        rows = {}
        slots = even = None
        for name, policy in variants.items():
            logits, stats, memory, trace, _ = streamed_pass(path, budget, seqs, device, quiet, f"{budget} {name}",
                                                            **policy)
            if policy.get("split_cache", True) or slots is None:  # the oracle's cache: the default run's
                slots = list(memory.layer_slots)
            even = [memory.slots_per_layer] * len(regions)
            ppl, top1 = quality(logits, seqs, ref)
            fetched = sum(s.misses + s.prefetched for s in stats) / n_tok
            floor = simulate(trace, n_hot, memory.layer_slots, bb, "belady", 0, gap)
            rows[name] = {"policy": policy, "neurons_fetched_per_token": fetched,
                          "bytes_per_token": sum(s.bytes_read for s in stats) / n_tok,
                          "predicted_per_token": sum(s.predicted for s in stats) / n_tok,
                          "ppl": ppl, "ppl_rise_pct": 100 * (ppl / ppl_dense - 1), "top1_agreement": top1,
                          "belady_same_trace_fetched": float(floor.fetched.mean())}
        sim = simulate(oracle_trace, n_hot, slots, bb, "belady", 0, gap)
        online = simulate(oracle_trace, n_hot, slots, bb, _EV, Policy.window, gap)
        even_sim = sim if even == slots else simulate(oracle_trace, n_hot, even, bb, "belady", 0, gap)
        oracle = {"neurons_fetched_per_token": float(sim.fetched.mean()), "bytes_per_token": float(sim.bytes.mean()),
                  "even_fetched_per_token": float(even_sim.fetched.mean()),  # every layer the same cache
                  "online_fetched_per_token": float(online.fetched.mean()),
                  "online_bytes_per_token": float(online.bytes.mean()),
                  "active_per_token": float(sum(len(p) for layer in oracle_trace for p in layer) / n_tok),
                  "ppl": ppl_o, "ppl_rise_pct": 100 * (ppl_o / ppl_dense - 1), "top1_agreement": top1_o}
        for row in rows.values():
            row["fetched_vs_oracle"] = row["neurons_fetched_per_token"] / max(oracle["neurons_fetched_per_token"], 1e-12)
        out["budgets"][budget] = {"cache_slots_per_layer": slots, "even_slots_per_layer": even[0], "variants": rows,
                                  "oracle": oracle}
    return out


def _after(r: dict) -> str:
    return f" (after the first {r['skipped_tokens']})" if r.get("skipped_tokens") else ""


def ablation_markdown(r: dict) -> str:
    """The ablation as markdown: one table per budget."""
    lines = [f"Fetch ablation: {r['layout']}, {r['tokens']} held-out tokens{_after(r)} teacher-forced, dense ppl "
             f"{r['ppl_dense']:.3f}, dense FFN {r['dense_bytes'] / 1024:.0f} KiB/token"]
    for budget, b in r["budgets"].items():
        o = b["oracle"]
        lines += ["", f"Budget {budget} (cache slots by layer {b['cache_slots_per_layer']}; "
                      f"{b.get('even_slots_per_layer', '?')} each if the same for all)", "",
                  "| variant | neurons fetched/token | vs oracle | Belady same trace | KiB/token | predicted/token "
                  "| ppl | rise | top-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in b["variants"].items():
            lines.append(f"| {name} | {v['neurons_fetched_per_token']:.1f} | x{v['fetched_vs_oracle']:.2f} | "
                         f"{v['belady_same_trace_fetched']:.1f} | {v['bytes_per_token'] / 1024:.1f} | "
                         f"{v['predicted_per_token']:.1f} | {v['ppl']:.3f} | {v['ppl_rise_pct']:+.2f}% | "
                         f"{v['top1_agreement']:.3f} |")
        lines.append(f"| oracle (true active + Belady, simulated) | {o['neurons_fetched_per_token']:.1f} | x1.00 | | "
                     f"{o['bytes_per_token'] / 1024:.1f} | {o['active_per_token']:.1f} | {o['ppl']:.3f} | "
                     f"{o['ppl_rise_pct']:+.2f}% | {o['top1_agreement']:.3f} |")
        if "even_fetched_per_token" in o:
            lines.append(f"| oracle, every layer the same cache | {o['even_fetched_per_token']:.1f} | "
                         f"x{o['even_fetched_per_token'] / max(o['neurons_fetched_per_token'], 1e-12):.2f} | | | | | | |")
        lines.append(f"| online floor (true active + {_EV} eviction, window {Policy.window}, simulated) | "
                     f"{o['online_fetched_per_token']:.1f} | "
                     f"x{o['online_fetched_per_token'] / max(o['neurons_fetched_per_token'], 1e-12):.2f} | | "
                     f"{o['online_bytes_per_token'] / 1024:.1f} | {o['active_per_token']:.1f} | | | |")
    return "\n".join(lines)
