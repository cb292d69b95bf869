"""Compression plugins side by side: one row per ratio (1 = no plugin) on held-out text.

Per ratio: prefill FLOPs (counted by torch's FlopCounterMode, attention included) and wall time,
FFN bytes the streamed engine reads during prefill (with a layout), KV-cache bytes after prefill,
continuation perplexity and its rise over ratio 1, greedy agreement with the uncompressed run, and
the plugin's parameters as a share of the model's. docs/plugins.md defines every column.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from sparseflash.layout.plugin_train import ReferenceModel, continuation_score, eval_windows, open_reference
from sparseflash.model.generate import Sampling, generate, new_generation_cache
from sparseflash.model.plugin import CompressionPlugin
from sparseflash.model.transformer import Transformer
from sparseflash.units import fmt_bytes

# Variator (Xiao et al., EMNLP Findings 2023), T5-base, 7 datasets: computation saved, extra
# parameters, quality drop.
VARIATOR = {"flops_saved": 0.53, "param_share": 0.009, "quality_drop": "< 2%"}


@dataclass(frozen=True)
class PluginEvalParams:
    """Window shape and sample sizes (tokens, windows)."""

    prompt_tokens: int = 256
    continuation_tokens: int = 64
    windows: int = 32  # held-out windows for perplexity and agreement
    stream_windows: int = 8  # of those, prefilled through the streamed engine (with a layout)
    budget: str = "25%ffn"  # the streamed engine's budget
    batch: int = 8


def open_measured(model_path) -> ReferenceModel:
    """The model a table is measured on: a checkpoint (layout/plugin_train.py:open_reference), or a
    .sflash layout with every FFN bundle loaded (its resident weights as stored, f16 or quantized),
    whose header gives the source checkpoint hash."""
    if model_path is None or not str(model_path).endswith(".sflash"):
        return open_reference(model_path)
    from sparseflash.runtime.layout_model import open_layout

    lm = open_layout(model_path, with_ffn=True)
    params = lm.weights.parameter_count()
    return ReferenceModel(Transformer(lm.config, lm.weights), lm.tokenizer, lm.header.source_hash, params,
                          str(model_path), lm.close)


def prefill_flops(model: Transformer, prompt: torch.Tensor, plugin: CompressionPlugin | None) -> int:
    """FLOPs of one prefill of ``prompt`` (1, tokens), logits of the last position only."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):  # CPU attention is not in torch's registry
        return sdpa_flop_count(q, k, v)

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten.scaled_dot_product_attention: sdpa, aten._scaled_dot_product_flash_attention_for_cpu: sdpa})
    cache = new_generation_cache(model, prompt.shape[1], prompt.shape[1], plugin=plugin)
    with counter:
        model(prompt, cache=cache, start=0, last_only=True, plugin=plugin)
    return int(counter.get_total_flops())


def _prefill_timed(model: Transformer, seqs: torch.Tensor, prompt: int, plugin) -> tuple[float, int, int]:
    """(median prefill seconds, KV bytes filled, KV bytes allocated for prompt + continuation)."""
    times, cache = [], None
    for i in range(len(seqs) + 1):  # the first prefill warms up and is not timed
        cache = new_generation_cache(model, prompt, seqs.shape[1], plugin=plugin)
        t = time.perf_counter()
        model(seqs[i % len(seqs), None, :prompt], cache=cache, start=0, last_only=True, plugin=plugin)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times), cache.used_nbytes, cache.nbytes


def _greedy_agreement(model, seqs, prompt, cont, plugin, reference: list[list[int]] | None
                      ) -> tuple[float, float, list]:
    """(share of greedily generated tokens equal to the uncompressed run's, position by position;
    mean count of leading tokens equal to it; the runs)."""
    runs = [generate(model, s[:prompt].tolist(), cont, Sampling(greedy=True), stop_at_eos=False, plugin=plugin).tokens
            for s in seqs]
    if reference is None:
        return 1.0, float(cont), runs
    same = sum(a == b for run, ref in zip(runs, reference) for a, b in zip(run, ref))
    prefix = [next((i for i, (a, b) in enumerate(zip(run, ref)) if a != b), len(ref)) for run, ref in zip(runs, reference)]
    return same / sum(len(r) for r in reference), statistics.mean(prefix), runs


def streamed_prefill_bytes(layout: str, plugin_path: str | None, seqs: torch.Tensor, prompt: int,
                           budget: str) -> dict:
    """Mean FFN bytes read and neurons computed (the per-layer unions of predicted neurons, summed
    over layers) during a streamed prefill, each from a cold neuron cache (hot region only:
    ``reuse=False``), so that every prompt reads its own unions. Bytes are what the reader reads:
    whole blocks, with small gaps between wanted bundles merged into one request."""
    from sparseflash.runtime.session import open_streamed

    model = open_streamed(layout, budget, plugins=[plugin_path] if plugin_path else [], reuse=False)
    try:
        plugin = model.plugins[0] if model.plugins else None
        read, neurons = [], []
        for s in seqs:
            model.engine.stats.clear()
            cache = new_generation_cache(model.transformer, prompt, prompt, plugin=plugin)
            model.transformer(s[None, :prompt], cache=cache, start=0, last_only=True, plugin=plugin)
            read.append(model.engine.stats[0].bytes_read)
            neurons.append(model.engine.stats[0].predicted)
        return {"prefill_ffn_bytes": statistics.mean(read), "prefill_neurons": statistics.mean(neurons),
                "budget_bytes": model.engine.memory.budget, "plugin_bytes": sum(p.nbytes for p in model.plugins)}
    finally:
        model.close()


def evaluate_plugins(model_path, plugin_paths: list[str], corpus, params: PluginEvalParams = PluginEvalParams(),
                     layout: str | None = None, quiet: bool = False) -> dict:
    """The table: one row per ratio (1 first), measured on ``corpus`` windows of prompt + continuation."""
    from sparseflash.model.text import corpus_ids

    p = params
    ref = open_measured(model_path)
    layout = layout or ref.layout_path
    try:
        plugins = sorted(zip(ref.load_plugins(plugin_paths), plugin_paths), key=lambda pp: pp[0].ratio)
        length = p.prompt_tokens + p.continuation_tokens
        seqs = eval_windows(corpus_ids(corpus, ref.tokenizer, p.windows * length + 1), length, p.windows)
        model = ref.transformer
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(plugins) + 1, unit="ratio", desc="plugins eval", leave=False)
        rows, base, base_runs = [], None, None
        for plugin, path in [(None, None), *plugins]:
            row = _measure(model, seqs, p, plugin, path, layout, ref.parameters,
                           None if base is None else base["_score"].logprobs)
            score = row.pop("_score")
            agreement, prefix, runs = _greedy_agreement(model, seqs, p.prompt_tokens, p.continuation_tokens, plugin,
                                                        base_runs)
            if base is None:
                base, base_runs = row | {"_score": score}, runs
            row["greedy_agreement"] = agreement
            row["greedy_prefix_tokens"] = prefix
            row["top1_agreement"] = float((score.argmax == base["_score"].argmax).float().mean())
            row["ppl_rise"] = row["continuation_ppl"] / base["continuation_ppl"] - 1
            row["prefill_flops_saved"] = 1 - row["prefill_flops"] / base["prefill_flops"]
            row["kv_bytes_saved"] = 1 - row["kv_bytes"] / base["kv_bytes"]
            if row.get("prefill_ffn_bytes") is not None:
                row["prefill_ffn_bytes_saved"] = 1 - row["prefill_ffn_bytes"] / max(base["prefill_ffn_bytes"], 1)
                row["prefill_neurons_saved"] = 1 - row["prefill_neurons"] / max(base["prefill_neurons"], 1)
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        kept = min((r["uncompressed_tokens"] for r in rows[1:]), default=16)
        cut = _truncation_baseline(model, seqs, p, kept, base["_score"], base_runs)
    finally:
        if ref.close is not None:
            ref.close()
    return {"settings": {**asdict(p), "corpus": str(corpus), "windows": len(seqs), "layout": layout,
                         "model_parameters": ref.parameters, "threads": torch.get_num_threads()},
            "rows": rows, "truncated": cut, "variator": VARIATOR}


def _truncation_baseline(model, seqs, p: PluginEvalParams, kept: int, base, base_runs) -> dict:
    """Quality when the prompt is cut to its last ``kept`` tokens (what the uncompressed tail alone
    gives): the floor a plugin must beat."""
    short = seqs[:, p.prompt_tokens - kept :]
    score = continuation_score(model, short, kept, None, p.batch, reference=base.logprobs)
    agreement, prefix, _ = _greedy_agreement(model, short, kept, p.continuation_tokens, None, base_runs)
    return {"kept_tokens": kept, "continuation_ppl": score.ppl, "ppl_rise": score.ppl / base.ppl - 1,
            "kl_to_uncompressed": score.kl, "greedy_agreement": agreement, "greedy_prefix_tokens": prefix,
            "top1_agreement": float((score.argmax == base.argmax).float().mean())}


def _measure(model, seqs, p: PluginEvalParams, plugin, path, layout, model_params, reference) -> dict:
    prompt = p.prompt_tokens
    seconds, kv_used, kv_alloc = _prefill_timed(model, seqs, prompt, plugin)
    score = continuation_score(model, seqs, prompt, plugin, p.batch, reference, keep_logprobs=plugin is None)
    row = {
        "ratio": 1 if plugin is None else plugin.ratio,
        "layer": None if plugin is None else plugin.layer,
        "tail": None if plugin is None else plugin.tail,
        "rope": None if plugin is None else plugin.spec.rope,
        "plugin": path,
        "prompt_positions_after": prompt if plugin is None else prompt - plugin.groups(prompt) * (plugin.ratio - 1),
        "uncompressed_tokens": prompt if plugin is None else prompt - plugin.groups(prompt) * plugin.ratio,
        "prefill_flops": prefill_flops(model, seqs[:1, :prompt], plugin),
        "prefill_ms": seconds * 1e3,
        "kv_bytes": kv_used,
        "kv_bytes_allocated": kv_alloc,
        "continuation_ppl": score.ppl,
        "continuation_tokens": score.tokens,
        "kl_to_uncompressed": 0.0 if plugin is None else score.kl,
        "plugin_params": 0 if plugin is None else plugin.param_count,
        "plugin_param_share": 0.0 if plugin is None else plugin.param_count / model_params,
        "prefill_ffn_bytes": None,
        "_score": score,
    }
    if layout is not None:
        row.update(streamed_prefill_bytes(layout, path, seqs[: p.stream_windows], prompt, p.budget))
    return row


def format_table(result: dict) -> str:
    """The eval table as text, with Variator's figures underneath."""
    s = result["settings"]
    lines = [f"{s['windows']} windows of {s['prompt_tokens']} prompt + {s['continuation_tokens']} continuation "
             f"tokens from {s['corpus']}",
             "| ratio | layer | positions | prefill GFLOP | FLOPs saved | prefill ms | streamed prefill neurons "
             "| streamed prefill FFN read | KV bytes | cont. ppl | ppl rise | KL | greedy agree (prefix) | top-1 agree "
             "| plugin params |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ffn = neurons = "-"
        if r.get("prefill_ffn_bytes") is not None:
            ffn = f"{fmt_bytes(r['prefill_ffn_bytes'])} ({-100 * r.get('prefill_ffn_bytes_saved', 0.0):+.0f}%)"
            neurons = f"{r['prefill_neurons']:.0f} ({-100 * r.get('prefill_neurons_saved', 0.0):+.0f}%)"
        lines.append(
            f"| {r['ratio']} | {'-' if r['layer'] is None else r['layer']} | {r['prompt_positions_after']} | "
            f"{r['prefill_flops'] / 1e9:.3f} | {100 * r['prefill_flops_saved']:.1f}% | {r['prefill_ms']:.1f} | {neurons} | {ffn} | "
            f"{fmt_bytes(r['kv_bytes'])} ({-100 * r['kv_bytes_saved']:+.0f}%) | {r['continuation_ppl']:.3f} | "
            f"{100 * r['ppl_rise']:+.2f}% | {r['kl_to_uncompressed']:.4f} | {100 * r['greedy_agreement']:.1f}% ({r['greedy_prefix_tokens']:.1f}) | {100 * r['top1_agreement']:.1f}% | "
            f"{r['plugin_params']:,} ({100 * r['plugin_param_share']:.2f}%) |")
    t = result["truncated"]
    lines.append(f"prompt cut to its last {t['kept_tokens']} tokens (no plugin): cont. ppl {t['continuation_ppl']:.3f} "
                 f"({100 * t['ppl_rise']:+.2f}%), KL {t['kl_to_uncompressed']:.4f}, greedy agreement "
                 f"{100 * t['greedy_agreement']:.1f}% ({t['greedy_prefix_tokens']:.1f}), top-1 agreement {100 * t['top1_agreement']:.1f}%")
    v = result["variator"]
    lines.append(f"Variator (T5-base, reported): {100 * v['flops_saved']:.0f}% computation saved, "
                 f"{100 * v['param_share']:.1f}% extra parameters, quality drop {v['quality_drop']}")
    return "\n".join(lines)


def save_plot(result: dict, path: str) -> None:
    """PNG: prefill FLOPs and FFN bytes saved, and perplexity rise, against the ratio."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(ratios, [100 * r["prefill_flops_saved"] for r in rows], "o-", label="prefill FLOPs saved")
    ax[0].plot(ratios, [100 * r["kv_bytes_saved"] for r in rows], "^-", label="KV-cache bytes saved")
    if len(rows) > 1 and all(r.get("prefill_ffn_bytes_saved") is not None for r in rows[1:]):
        ax[0].plot(ratios, [100 * r.get("prefill_neurons_saved", 0.0) for r in rows], "v-",
                   label="streamed prefill: predicted neurons saved")
        ax[0].plot(ratios, [100 * r.get("prefill_ffn_bytes_saved", 0.0) for r in rows], "s-",
                   label="streamed prefill: FFN bytes read saved")
    ax[0].axhline(100 * VARIATOR["flops_saved"], ls="--", c="gray", label="Variator: 53% computation saved")
    ax[1].plot(ratios, [100 * r["ppl_rise"] for r in rows], "o-", label="continuation perplexity rise")
    ax[1].axhline(2.0, ls="--", c="gray", label="+2% (target; Variator's drop < 2%)")
    cut = result.get("truncated")
    if cut:
        ax[1].axhline(100 * cut["ppl_rise"], ls=":", c="C3",
                      label=f"prompt cut to its last {cut['kept_tokens']} tokens (no plugin)")
    right = ax[1].twinx()
    right.plot(ratios, [r["kl_to_uncompressed"] for r in rows], "s--", c="C2", label="KL to uncompressed (right)")
    right.set_ylabel("KL (nats/token)")
    for a in ax:
        a.set(xlabel="compression ratio", ylabel="%", xscale="log")
        a.set_xticks(ratios, [str(r) for r in ratios])
        a.minorticks_off()
    ax[0].legend(fontsize=7)
    lines = ax[1].get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax[1].legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
