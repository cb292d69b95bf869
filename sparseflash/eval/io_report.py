"""``sparseflash io-report``: FFN I/O per token of four ways of running, measured in one run.

Teacher-forced on the same held-out tokens (token by token, as decoding reads):
- ``dense-stream``: every FFN byte read every token (naive offloading);
- ``sparse``: predicted bundles, nothing kept between tokens (hot region still resident);
- ``sparse+window``: predicted bundles through the neuron cache (the runtime's default, but that every
  predicted neuron is read here: the layout's cost-aware miss cut is off in these modes and in the
  eviction comparison, so that they all handle the same neuron sets; ``--ablation`` measures it);
- ``oracle``: the true active sets with Belady's optimal eviction in a cache of the same size.
Bytes, requests and I/O time come from real reads of the layout file (direct I/O); the oracle's
reads are the misses of a Belady replay of its recorded trace, issued for real too. Look-ahead
prefetch is off here, so I/O time is the wall time of the reads, not what overlap would hide.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparseflash.eval.simulate import simulate
from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.format_extents import extent_bytes, plan_extents
from sparseflash.model.perplexity import windows
from sparseflash.model.transformer import Transformer
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import open_layout
from sparseflash.runtime.policy import DEFAULT_EVICTION, EVICTION_POLICIES
from sparseflash.runtime.session import open_streamed
from sparseflash.runtime.streamer import BundleReader

MODES = ("dense-stream", "sparse", "sparse+window", "oracle")


def quality(logits: torch.Tensor, seqs: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(perplexity, top-1 agreement with ``ref``) of teacher-forced logits (windows, ctx, vocab)."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
    agree = (logits[:, :-1].argmax(-1) == ref[:, :-1].argmax(-1)).float().mean()
    return float(torch.exp(nll)), float(agree)


def _dense_pass(lm, seqs):
    """Dense logits and, with oracle masking, the oracle's logits and true active trace."""
    c = lm.config
    tap = NeuronTap(lm.weights, [r.threshold for r in lm.file.layers])
    dense = Transformer(c, lm.weights)
    trace = [[] for _ in range(c.num_layers)]

    def oracle_hook(l, x, a):
        m = tap.active(l, a)
        for row in m.numpy():
            trace[l].append(np.nonzero(row)[0])
        return a * m

    oracle = tap.transformer(c, oracle_hook)
    ref = torch.cat([dense(seqs[i : i + 1]) for i in range(len(seqs))])
    orc = torch.cat([oracle(seqs[i : i + 1]) for i in range(len(seqs))])
    return ref, orc, trace


def streamed_pass(path, budget, seqs: torch.Tensor, device: DeviceModel | None = None, quiet: bool = True,
                  desc: str = "streamed", **policy):
    """Teacher-force ``seqs`` (windows, ctx) token by token through the streamed engine, as decoding
    reads: (logits (windows, ctx, vocab), per-token stats, memory plan, predicted trace, direct I/O)."""
    model = open_streamed(path, budget, disk=device, **policy)
    model.engine.trace = [[] for _ in range(model.layout.config.num_layers)]
    try:
        model.engine.stats.clear()
        out = []
        for w in tqdm(range(len(seqs)), desc=desc, disable=quiet, leave=False):
            cache = model.transformer.new_cache(seqs.shape[1])
            out.append(torch.cat([model.transformer(seqs[w : w + 1, i : i + 1], cache=cache, start=i)
                                  for i in range(seqs.shape[1])], dim=1))
        stats = list(model.engine.stats)
        return torch.cat(out), stats, model.engine.memory, model.engine.trace, model.engine.fetcher.reader.direct
    finally:
        model.close()


def _engine_pass(path, budget, seqs, reuse: bool, device, quiet, desc, eviction: str = DEFAULT_EVICTION):
    """One engine pass of the modes / eviction comparison: every predicted neuron is computed (the layout's
    miss cut off), so that all of them handle the same neuron sets; `--ablation` measures the miss cut."""
    return streamed_pass(path, budget, seqs, device, quiet, desc, reuse=reuse, lookahead=False, eviction=eviction,
                         miss_cut=False)


def _row(bytes_tok, requests_tok, hits, looked, io_s_tok, dense_bytes, ppl, top1, model_s_tok=None):
    """One mode's figures per token; ``model_s_tok``: the device model's time for the same reads (then
    the achieved GB/s, bytes over I/O time, sits next to the model's)."""
    gbps = {} if model_s_tok is None else {
        "achieved_gbps": float(bytes_tok / io_s_tok / 1e9) if io_s_tok > 0 else 0.0,
        "device_model_gbps": float(bytes_tok / model_s_tok / 1e9) if model_s_tok > 0 else 0.0}
    return {**gbps,
        "bytes_per_token": float(bytes_tok),
        "dense_share": float(bytes_tok / dense_bytes) if dense_bytes else 0.0,
        "requests_per_token": float(requests_tok),
        "bytes_per_request": float(bytes_tok / requests_tok) if requests_tok else 0.0,
        "hit_rate": float(hits / looked) if looked else 0.0,
        "io_ms_per_token": float(io_s_tok * 1e3),
        "ppl": ppl,
        "top1_agreement": top1,
    }


def _engine_row(stats, n_tok, dense_bytes, ppl=None, top1=None) -> dict:
    """A report row from an engine pass's per-token stats."""
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    row = _row(sum(s.bytes_read for s in stats) / n_tok, sum(s.requests for s in stats) / n_tok, hits,
               hits + misses, sum(s.io_wait_s for s in stats) / n_tok, dense_bytes, ppl, top1)
    row["neurons_fetched_per_token"] = misses / n_tok
    nbytes, busy, model = (sum(getattr(s, k) for s in stats) for k in ("bytes_read", "read_busy_s", "model_read_s"))
    row["achieved_gbps"] = nbytes / busy / 1e9 if busy > 0 else 0.0  # achieved next to the device model, same reads
    row["device_model_gbps"] = nbytes / model / 1e9 if model > 0 else 0.0
    return row


def _measure_reads(path, regions, device, reads_per_token: list[list[np.ndarray]], quiet, desc
                   ) -> tuple[float, float, float, float]:
    """Issue the given per-token, per-layer position reads for real, as the engine's reader does (at the
    queue depth and request size the device model plans); mean (seconds, bytes, requests, the device
    model's seconds for the same reads) per token, as measured by the reader."""
    threads, size = device.plan_io()
    reader = BundleReader(path, regions, device, "direct", threads, size)
    try:
        scratch = [np.zeros((r.n_neurons, r.bundle_len), dtype=np.uint16 if r.dtype != "f32" else np.float32)
                   for r in regions]
        seconds = nbytes = requests = model_s = 0
        for per_layer in tqdm(reads_per_token, desc=desc, disable=quiet, leave=False):
            t = time.perf_counter()
            for l, pos in enumerate(per_layer):
                if len(pos):
                    result = reader.read(l, pos, scratch[l], np.arange(len(pos)))
                    nbytes += result.bytes
                    requests += result.requests
                    model_s += result.model_s
            seconds += time.perf_counter() - t
        n = max(len(reads_per_token), 1)
        return seconds / n, nbytes / n, requests / n, model_s / n
    finally:
        reader.close()


def io_report(paths: list[str], ids: list[int], tokens: int = 1024, ctx: int = 256, budget: str = "50%ffn",
              device: DeviceModel | None = None, quiet: bool = False, sweep: bool = True,
              evictions: bool = True) -> dict:
    """The four modes for every layout file; the first file also gets budget and window sweeps and
    the eviction-policy comparison."""
    if device is None:
        from sparseflash.runtime.diskprobe import device_model_for

        device = device_model_for(paths[0])
    seqs = windows(ids, ctx, tokens)
    report = {"tokens": int(seqs.numel()), "ctx": ctx, "budget": budget, "device_model": device.to_dict(),
              "layouts": []}
    for path in paths:
        lm = open_layout(path, with_ffn=True)
        try:
            regions = list(lm.file.layers)
            dense_bytes = lm.ffn_bytes
            ref, orc_logits, oracle_trace = _dense_pass(lm, seqs)
            n_hot = [r.n_hot for r in regions]
            order = lm.header.provenance.get("order")
        finally:
            lm.close()
        ppl_dense, _ = quality(ref, seqs, ref)
        modes = {}
        n_tok = int(seqs.numel())

        # sparse and sparse+window: the real engine
        engine_runs = {}
        for name, reuse in (("sparse", False), ("sparse+window", True)):
            logits, stats, memory, trace, direct = _engine_pass(path, budget, seqs, reuse, device, quiet, name)
            modes[name] = _engine_row(stats, n_tok, dense_bytes, *quality(logits, seqs, ref))
            engine_runs[name] = (memory, trace)
        memory, predicted_trace = engine_runs["sparse+window"]

        # dense-stream: every region, every token (measured on a sample of tokens: each reads the same)
        full = [[np.arange(r.n_neurons) for r in regions] for _ in range(min(n_tok, 32))]
        io_s, nbytes, requests, model_s = _measure_reads(path, regions, device, full, quiet, "dense-stream")
        modes["dense-stream"] = _row(nbytes, requests, 0, 0, io_s, dense_bytes, ppl_dense, 1.0, model_s)

        # oracle: Belady replay of the true trace in a cache of the engine's size, its misses read for real
        bb = regions[0].bundle_bytes
        sim = simulate(oracle_trace, n_hot, memory.layer_slots, bb, "belady", 0, device.merge_gap_blocks)
        reads = [[sim.misses[l][t] for l in range(len(regions))] for t in range(n_tok)]
        io_s, nbytes, requests, model_s = _measure_reads(path, regions, device, reads, quiet, "oracle reads")
        ppl_o, top1_o = quality(orc_logits, seqs, ref)
        total_needed = sum(len(p) for layer in oracle_trace for p in layer)
        modes["oracle"] = _row(nbytes, requests, total_needed - sim.fetched.sum(), total_needed, io_s, dense_bytes,
                               ppl_o, top1_o, model_s)
        modes["oracle"]["neurons_fetched_per_token"] = float(sim.fetched.mean())
        modes["oracle"]["simulated_bytes_per_token"] = float(sim.bytes.mean())
        entry = {"layout": str(path), "order": order, "modes": modes, "ppl_dense": ppl_dense,
                 "budget_bytes": memory.budget, "cache_slots_per_layer": list(memory.layer_slots),
                 "fetched_vs_oracle": (modes["sparse+window"]["neurons_fetched_per_token"]
                                       / max(modes["oracle"]["neurons_fetched_per_token"], 1e-12))}
        if sweep and path == paths[0]:
            entry["sweep"] = _sweeps(predicted_trace, oracle_trace, n_hot, regions, memory, device)
        if evictions and path == paths[0]:
            entry["eviction"] = _evictions(path, budget, seqs, device, quiet, modes["sparse+window"],
                                           predicted_trace, n_hot, regions, memory, dense_bytes)
        report["layouts"].append(entry)
    first = report["layouts"][0]
    report.update({"modes": first["modes"], "budget_bytes": first["budget_bytes"]})
    return report


def _evictions(path, budget, seqs, device, quiet, default_row, predicted_trace, n_hot, regions, memory,
               dense_bytes) -> dict:
    """Eviction beyond the window, measured: the engine (same predicted sets, same budget) with each
    policy, and Belady's optimum on the recorded predicted trace (of the default run) as the floor."""
    n_tok = int(seqs.numel())
    keys = ("bytes_per_token", "requests_per_token", "hit_rate", "neurons_fetched_per_token")
    out = {}
    for policy in EVICTION_POLICIES:
        if policy == DEFAULT_EVICTION:  # the sparse+window run
            out[policy] = {k: default_row[k] for k in keys}
            continue
        _, stats, _, _, _ = _engine_pass(path, budget, seqs, True, device, quiet, f"eviction {policy}", policy)
        row = _engine_row(stats, n_tok, dense_bytes)
        out[policy] = {k: row[k] for k in keys}
    sim = simulate(predicted_trace, n_hot, memory.layer_slots, regions[0].bundle_bytes, "belady", 0,
                   device.merge_gap_blocks)
    total = sum(len(p) for layer in predicted_trace for p in layer)
    out["belady"] = {"bytes_per_token": float(sim.bytes.mean()), "requests_per_token": float(sim.requests.mean()),
                     "hit_rate": float(1 - sim.fetched.sum() / max(total, 1)),
                     "neurons_fetched_per_token": float(sim.fetched.mean())}
    return out


def _sweeps(predicted, oracle, n_hot, regions, memory, device) -> dict:
    """Bytes per token vs cache size (LRU + window 4, and oracle) and vs window size (plain window
    policy and LRU) at the run's cache size; simulated on the recorded traces."""
    bb = regions[0].bundle_bytes
    n = regions[0].n_neurons
    gap = device.merge_gap_blocks
    shares = [0.1, 0.25, 0.5, 0.75, 1.0]
    by_budget = {"ffn_share": shares, "lru": [], "oracle": []}
    for share in shares:
        slots = max(1, int(share * n) - min(n_hot))
        by_budget["lru"].append(float(simulate(predicted, n_hot, slots, bb, "lru", 4, gap).bytes.mean()))
        by_budget["oracle"].append(float(simulate(oracle, n_hot, slots, bb, "belady", 0, gap).bytes.mean()))
    wins = [0, 1, 2, 4, 8, 16]
    by_window = {"window": wins, "window_only": [], "window_only_slots": [], "lru": [],
                 "lru_slots": list(memory.layer_slots)}
    for w in wins:
        nbytes, held = _window_only(predicted, n_hot, w, bb, gap)
        by_window["window_only"].append(float(nbytes))
        by_window["window_only_slots"].append(float(held))
        by_window["lru"].append(float(simulate(predicted, n_hot, memory.layer_slots, bb, "lru", w, gap).bytes.mean()))
    return {"by_budget": by_budget, "by_window": by_window}


def _window_only(trace, n_hot, window, bb, gap) -> tuple[float, float]:
    """LLM-in-a-Flash's plain sliding window: keep exactly the neurons used in the last k tokens,
    however many that is. Returns (bytes read per token, mean neurons held per layer): its memory
    is not bounded by the budget, so both are reported."""
    total = 0
    held_sum = 0
    tokens = len(trace[0])
    for l, layer in enumerate(trace):
        recent: list[set] = []
        for t in range(tokens):
            need = set(int(p) for p in layer[t] if p >= n_hot[l])
            held = set().union(*recent) if recent else set()
            held_sum += len(held | need)
            miss = np.array(sorted(need - held), dtype=np.int64)
            total += extent_bytes(plan_extents(miss, bb, gap))
            recent.append(need)
            if len(recent) > window:
                recent.pop(0)
    return total / tokens, held_sum / (tokens * len(trace))


def save_report(report: dict, out_dir: str | Path) -> None:
    """io_report.json, io_report.md and io_vs_budget.png in ``out_dir``, each written atomically."""
    import json
    import os

    from sparseflash.eval.render import io_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("io_report.json", json.dumps(report, indent=1)), ("io_report.md", io_markdown(report) + "\n")):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot_io(report, out / "io_vs_budget.png")


def plot_io(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["layouts"][0].get("sweep")
    if not sweep:
        return
    dense = report["modes"]["dense-stream"]["bytes_per_token"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    b = sweep["by_budget"]
    x = [100 * s for s in b["ffn_share"]]
    axes[0].plot(x, [v / 1024 for v in b["lru"]], "o-", label="sparse+window (LRU, k=4)")
    axes[0].plot(x, [v / 1024 for v in b["oracle"]], "s--", label="oracle (Belady)")
    axes[0].axhline(dense / 1024, color="gray", ls=":", label="dense-stream")
    axes[0].set(xlabel="hot region + cache (% of FFN bytes)", ylabel="FFN KiB read per token",
                title="Bytes per token vs budget", yscale="log")
    axes[0].legend(fontsize=8)
    w = sweep["by_window"]
    axes[1].plot(w["window"], [v / 1024 for v in w["window_only"]], "o-",
                 label="plain k-token window (memory grows with k)")
    axes[1].plot(w["window"], [v / 1024 for v in w["lru"]], "s-", label="window k + LRU in the budget")
    axes[1].set(xlabel="window k (tokens)", ylabel="FFN KiB read per token", title="Bytes per token vs window")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
