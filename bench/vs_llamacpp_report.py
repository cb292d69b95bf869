"""Figures and the printed table of bench_vs_llamacpp.py, from the measured runs' JSON results."""

from __future__ import annotations

MiB = 1 << 20

CONFIG_TITLES = {
    "llama-mem": "llama.cpp, in memory (no mmap)",
    "llama-mmap": "llama.cpp, mmap, capped",
    "sf-dense": "sparseflash dense, in memory (f32)",
    "sf-stream": "sparseflash streamed, predicted neurons, capped",
    "sf-stream-all": "sparseflash streamed, all neurons (exact), capped",
}

DEFINITIONS = (
    "decode tok/s: tokens after the first / their time. e2e tok/s: all generated tokens / (prompt + decode time), "
    "loading excluded (load s). disk MiB/token: read_bytes of /proc/self/io (block-device reads of the process, "
    "all threads) over generation / generated tokens; the model files' page cache is dropped before each "
    "configuration. peak RSS: ru_maxrss (includes mapped file pages). cgroup peak: the configuration's cgroup "
    "usage peak during generation, page cache charged to it included. greedy = llama-mem: tokens, summed over "
    "prompts, before the first difference from llama.cpp in memory."
)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize_run(r: dict, reference: dict | None) -> dict:
    """Rates (tokens/s) and per-token figures (bytes) of one configuration's worker result."""
    if "error" in r:
        return {"error": r["error"]}
    runs = r["runs"]
    generated = sum(len(x["tokens"]) for x in runs)
    steps = sum(len(x["tokens"]) - 1 for x in runs)
    decode_s = sum(x["decode_s"] for x in runs)
    total_s = sum(x["prefill_s"] + x["decode_s"] for x in runs)
    row = {
        "prompts_run": len(runs),
        "generated_tokens": generated,
        "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None,
        "end_to_end_tokens_per_s": generated / total_s if total_s > 0 else None,
        "prefill_s": sum(x["prefill_s"] for x in runs),
        "load_s": r["load_s"],
        "disk_bytes_per_token": r["gen_read_bytes"] / generated if generated else None,
        "load_disk_bytes": r["load_read_bytes"],
        "peak_rss_bytes": r["ru_maxrss_bytes"],
        "cgroup_peak_bytes": r.get("cgroup_peak_bytes"),
        "baseline_bytes": r.get("baseline_bytes"),
        "cap_bytes": r.get("cap_bytes"),
        "oom_kills": r.get("oom_kills", 0),
    }
    if "engine_bytes_read" in r:
        row["engine_bytes_per_token"] = r["engine_bytes_read"] / generated
        row["memory_plan"] = r["memory_plan"]
        row["direct_io"] = r["direct_io"]
        row["strategy"] = r["strategy"]
        row["hit_rate"] = sum(x["hit_rate"] for x in runs) / len(runs)
        row["predicted_per_token"] = sum(x["predicted_per_token"] for x in runs) / len(runs)
    if reference and "runs" in reference:
        pairs = list(zip(runs, reference["runs"]))
        row["same_tokens_as_llama_mem"] = sum(common_prefix(a["tokens"], b["tokens"]) for a, b in pairs)
        row["compared_tokens"] = sum(min(len(a["tokens"]), len(b["tokens"])) for a, b in pairs)
    return row


def _fmt(value, scale=1.0, digits=1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _model_lines(m: dict, mechanism: str) -> list[str]:
    s = m["model"]
    w = m["weight_allowance_bytes"]
    lines = [
        f"## {s['name']}: GGUF f16 {s['gguf_bytes'] / MiB:.1f} MiB; layout: FFN {s['ffn_bytes'] / MiB:.1f} MiB, "
        f"resident {s['resident_bytes'] / MiB:.1f} MiB, predictors {s['predictor_bytes'] / MiB:.1f} MiB",
        "",
        f"- cap: {mechanism}. Weights may use W = {w / MiB:.1f} MiB ({w / s['gguf_bytes']:.0%} of the GGUF) on top "
        f"of each process's non-weight memory; sparseflash --budget = W (engine minimum "
        f"{s['min_budget_bytes'] / MiB:.1f} MiB with predictors), KV cache {s['kv_bytes'] / MiB:.1f} MiB.",
    ]
    if m.get("read_ahead_kb") is not None:
        lines.append(f"- disk read-ahead {m['read_ahead_kb']} KiB: a page fault on llama.cpp's mapping reads around "
                     "the faulting page by up to this much, and under the cap much of it is evicted before use.")
    prof = s.get("profile") or {}
    if prof.get("sparsity") is not None:
        lines.append(f"- profile ({prof['thresholds']} thresholds): {prof['sparsity']:.1%} of FFN neurons inactive "
                     f"per token; predictors ({prof['strategy']}) skip {prof['predicted_sparsity']:.1%} with recall "
                     f"{prof['predictor_recall']:.1%} (held-out tokens).")
    if "random" in s["name"]:
        lines.append("- random weights: no trained sparsity structure. Predictions are poor (low recall, nearly the "
                     "same neurons every token), so the 'predicted neurons' row reads little and its tokens differ "
                     "from the start; the 'all neurons' row computes the same function as llama.cpp and is the "
                     "one that shows the I/O machinery.")
    return lines


def _table_lines(m: dict) -> list[str]:
    w = m["weight_allowance_bytes"]
    head = ("| configuration | cap MiB (non-weight + W) | decode tok/s | e2e tok/s | load s | disk MiB/token | load disk MiB "
            "| peak RSS MiB | cgroup peak MiB | greedy = llama-mem |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for config, title in CONFIG_TITLES.items():
        r = m["rows"].get(config)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {title} | failed: {r['error']} | | | | | | | | |")
            continue
        agree = f"{r['same_tokens_as_llama_mem']}/{r['compared_tokens']}" if "compared_tokens" in r else "-"
        cap = f"{r['cap_bytes'] / MiB:.1f} ({(r['cap_bytes'] - w) / MiB:.1f} + W)" if r.get("cap_bytes") else "none"
        lines.append(
            f"| {title} | {cap} | {_fmt(r['decode_tokens_per_s'], digits=2)} | "
            f"{_fmt(r['end_to_end_tokens_per_s'], digits=2)} | {_fmt(r['load_s'], digits=2)} | "
            f"{_fmt(r['disk_bytes_per_token'], MiB, 2)} | {_fmt(r['load_disk_bytes'], MiB)} | "
            f"{_fmt(r['peak_rss_bytes'], MiB)} | {_fmt(r['cgroup_peak_bytes'], MiB)} | {agree} |")
    return lines


def _stream_lines(m: dict) -> list[str]:
    lines = []
    for config in ("sf-stream", "sf-stream-all"):
        r = m["rows"].get(config) or {}
        if "engine_bytes_per_token" not in r:
            continue
        plan = r["memory_plan"]
        lines.append(f"- {config}: engine's own count {r['engine_bytes_per_token'] / MiB:.2f} MiB/token "
                     f"({'O_DIRECT' if r['direct_io'] else 'buffered'}), {r['predicted_per_token']:.0f} neurons "
                     f"computed per token (all layers), cache hit rate {r['hit_rate']:.0%}; memory plan: resident "
                     f"{plan['resident'] / MiB:.1f}, predictors {plan['predictors'] / MiB:.1f}, hot "
                     f"{plan['hot'] / MiB:.1f}, cache {plan['cache'] / MiB:.1f} ({plan['slots_per_layer']} slots/layer),"
                     f" I/O buffers {plan['io_buffers'] / MiB:.1f} MiB.")
    return lines


def format_model(m: dict, mechanism: str) -> str:
    """One model's block: what was compared, under which cap, the table, and the streaming details."""
    lines = _model_lines(m, mechanism) + [""] + _table_lines(m)
    extra = _stream_lines(m)
    return "\n".join(lines + ([""] + extra if extra else []))
