"""Open a layout file for streamed generation and report what it cost."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from sparseflash.layout.schema_gate import kept_cut
from sparseflash.model.generate import GenerationResult, Sampling, generate
from sparseflash.model.plugin import CompressionPlugin, PluginError, load_plugin
from sparseflash.model.transformer import Transformer
from sparseflash.runtime.build import build_engine
from sparseflash.runtime.engine import StreamingFFN
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import LayoutModel, open_layout
from sparseflash.runtime.policy import Budget, Policy
from sparseflash.runtime.rss import peak_rss_bytes
from sparseflash.runtime.token_stats import TokenStats


@dataclass
class StreamedModel:
    layout: LayoutModel
    engine: StreamingFFN
    transformer: Transformer
    device_bytes_before: int | None = None  # device memory in use before the engine allocated any (real GPU)
    plugins: list[CompressionPlugin] = field(default_factory=list)  # resident, counted in the budget

    @property
    def tokenizer(self):
        return self.layout.tokenizer

    def close(self) -> None:
        self.engine.close()
        self.layout.close()


def layout_plugins(lm: LayoutModel, paths: Sequence[str | os.PathLike]) -> list[CompressionPlugin]:
    """Load compression plugins for a layout, refusing any made from another checkpoint."""
    source = lm.header.source_hash
    if paths and not source:
        raise PluginError(f"{lm.path}: the layout records no source checkpoint hash, so plugins cannot be checked "
                          "against it; rebuild it with `sparseflash prepare` or `sparseflash layout`")
    return [load_plugin(p, source, lm.config.num_layers, lm.config.hidden_size) for p in paths]


def open_streamed(path: str | os.PathLike, budget: str | int | Budget, backend: str = "cpu",
                  disk: DeviceModel | None = None, plugins: Sequence[str | os.PathLike] = (),
                  **policy) -> StreamedModel:
    """A transformer whose FFNs stream from ``path`` under ``budget`` (bytes, '2GiB', '40%', '25%ffn'
    or a Budget); ``policy`` holds Policy fields (window, eviction, strategy, verify, ...); without
    ``io_threads`` the reads in flight and their size come from the disk's model (io_policy).
    ``plugins`` (files) are loaded, checked against the layout's source and counted in the budget."""
    lm = open_layout(path, verify=policy.get("verify", Policy.verify))
    try:
        loaded = layout_plugins(lm, plugins)
        if disk is None:
            from sparseflash.runtime.diskprobe import device_model_for

            disk = device_model_for(path)
        if not isinstance(budget, Budget):
            budget = Budget.parse(budget, lm.weight_bytes)
        policy = Policy(budget, **io_policy(disk, budget, policy))
        before = None
        if policy.device == "cuda":
            from sparseflash.runtime.gpu import device_bytes_in_use

            before = device_bytes_in_use()
        engine, weights = build_engine(lm, policy, disk, backend, plugin_bytes=sum(p.nbytes for p in loaded))
    except BaseException:
        lm.close()
        raise
    transformer = Transformer(lm.config, weights, engine)
    for p in loaded:
        p.to(transformer.device)
    return StreamedModel(lm, engine, transformer, before, loaded)


IO_MEMORY_BYTES = 32 << 20  # most bytes of I/O buffers the automatic plan takes (and 1/16 of a byte budget)


def io_policy(disk: DeviceModel, budget: Budget, policy: dict) -> dict:
    """``policy`` with ``io_threads`` (reads in flight) and ``io_buffer_bytes`` (bytes per read) chosen
    from the device model when ``io_threads`` is absent or None (DeviceModel.plan_io; an explicit
    ``io_buffer_bytes`` stays the request size). The buffers count in the budget, so they take at most
    IO_MEMORY_BYTES, and 1/16 of a budget given in bytes."""
    if policy.get("io_threads") is not None:
        return policy
    memory = IO_MEMORY_BYTES if budget.nbytes is None else max(1, min(IO_MEMORY_BYTES, budget.nbytes // 16))
    threads, size = disk.plan_io(Policy.io_buffer_bytes, memory, request_bytes=policy.get("io_buffer_bytes"))
    return {**policy, "io_threads": threads, "io_buffer_bytes": size}


def summarize(stats: list[TokenStats], model: StreamedModel) -> dict:
    """Totals over generation: bytes read (vs dense streaming), requests, hits, times."""
    decode = stats[1:] if len(stats) > 1 else stats
    dense = model.layout.ffn_bytes
    total = lambda key, rows=stats: sum(getattr(s, key) for s in rows)  # noqa: E731
    per_token = total("bytes_read", decode) / max(len(decode), 1)
    looked_up = total("hits") + total("misses")
    engine = model.engine
    out = {
        "bytes_read": total("bytes_read"),
        "requests": total("requests"),
        "prefill_bytes_read": stats[0].bytes_read if stats else 0,
        "decode_bytes_per_token": per_token,
        "dense_ffn_bytes_per_token": dense,
        "decode_dense_share": per_token / dense if dense else 0.0,
        "hit_rate": total("hits") / looked_up if looked_up else 0.0,
        "predicted_per_token": total("predicted", decode) / max(len(decode), 1),
        "io_wait_s": total("io_wait_s"),
        "predictor_s": total("predictor_s"),
        "ffn_s": total("ffn_s"),
        "attention_s": total("attention_s"),
        "head_s": total("head_s"),
        "bookkeeping_s": sum(row[4] for st in stats for row in st.timeline),
        "step_s": total("token_s"),
        **read_bandwidth(total("bytes_read"), total("requests"), total("read_busy_s"), total("model_read_s"),
                         engine.fetcher.reader),
        "budget_bytes": engine.memory.budget,
        "plugin_bytes": engine.memory.plugins,
        "memory_plan": {k: getattr(engine.memory, k) for k in
                        ("resident", "plugins", "predictors", "hot", "cache", "index", "io_buffers", "slots_per_layer", "layer_slots", "split",
                         "minimum", "staging", "staging_rows")},
        "direct_io": engine.fetcher.reader.direct,
        "device": {"ffn": engine.policy.device, "resident": model.transformer.device.type},
        "strategy": engine.strategy,
        "quality_gate": model.layout.header.predictors.gate if model.layout.header.predictors else None,
        "miss_cut_layers": engine.miss_cut_layers(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if model.device_bytes_before is not None:  # a real GPU: what the run added to device memory
        from sparseflash.runtime.gpu import device_bytes_in_use

        out["device_bytes_used"] = device_bytes_in_use() - model.device_bytes_before
    return out


def read_bandwidth(nbytes: int, requests: int, busy_s: float, model_s: float, reader) -> dict:
    """Achieved read bandwidth next to what the device model says for the same reads: bytes over the
    time reads were in flight, and bytes over the model's time for the same pieces at the same queue
    depth (each read's pieces priced at min(pieces, io_threads) in flight, or all of them with AIO;
    ``model_s``, summed over the reads). Definitions: docs/figures.md."""
    return {"read_busy_s": busy_s, "achieved_gbps": nbytes / busy_s / 1e9 if busy_s > 0 else 0.0,
            "device_model_gbps": nbytes / model_s / 1e9 if model_s > 0 else 0.0,
            "device_model_qd1_gbps": nbytes / reader.device.read_time(requests, nbytes) / 1e9 if requests else 0.0,
            "achieved_share_of_model": model_s / busy_s if busy_s > 0 else 0.0,
            "mean_request_bytes": nbytes / requests if requests else 0.0, "io_threads": reader.threads,
            "io_engine": reader.engine,
            "io_buffer_bytes": reader.buffer_bytes, "device_model_depths": list(reader.device.depths)}


def summary_line(summary: dict) -> str:
    """One line of what a streamed run read and held."""
    from sparseflash.units import fmt_bytes

    return (f"[streamed: {summary['decode_bytes_per_token'] / 1024:.1f} KiB of FFN read per decoded token = "
            f"{summary['decode_dense_share']:.1%} of dense ({summary['dense_ffn_bytes_per_token'] / 1024:.0f} KiB), "
            f"{summary['requests']} requests, read {summary['achieved_gbps']:.2f} GB/s (device model "
            f"{summary['device_model_gbps']:.2f} {_depth_note(summary)}), hit rate {summary['hit_rate']:.1%}, I/O wait "
            f"{summary['io_wait_s'] * 1e3:.0f} ms, budget {fmt_bytes(summary['budget_bytes'])}{_split_note(summary)}, "
            f"peak RSS {fmt_bytes(summary['peak_rss_bytes'])}, strategy {summary['strategy']}{_gate_note(summary)}]")


def _split_note(summary: dict) -> str:
    """The cache's slots by layer, where the layout's cache demand split them (docs/runtime.md)."""
    plan = summary.get("memory_plan") or {}
    if not plan.get("split"):
        return ""
    return f" (cache slots by layer {'/'.join(str(x) for x in plan['layer_slots'])}, split by demand)"


def _depth_note(summary: dict) -> str:
    if summary.get("io_engine") == "aio":
        return "with each read's pieces in flight at once"
    return f"at {summary['io_threads']} in flight"


def _gate_note(summary: dict) -> str:
    """What prepare's quality gate chose for this layout (layout/quality_gate.py), in a few words."""
    gate = summary.get("quality_gate")
    if not gate:
        return ""
    rise = gate.get("rise_pct", {}).get(gate["strategy"])
    what = "exact, predicted modes missed" if gate["strategy"] == "all" else f"held-out ppl {rise:+.2f}%"
    miss = ""
    validated = [(gate.get("miss_share", 0), kept_cut(gate))] + [(e["share"], kept_cut(e))
                                                                 for e in gate.get("miss_larger", [])]
    validated = ", ".join(f"{k[0]} with {s:.0%} in memory" for s, k in validated if k is not None)
    if validated:
        used = summary.get("miss_cut_layers", 0)
        miss = (f"; miss cut on {used} layers ({validated})" if used else
                f"; miss cut ({validated}) not used (off, or the cache is under the validated share)")
    return (f" (quality gate: {'fallback, ' if gate.get('fallback') else ''}{what}, bound "
            f"+{gate['max_rise_pct']:g}%{miss}{'; model too dense to gain' if gate.get('too_dense') else ''})")


def stream_generate(model: StreamedModel, prompt: list[int], n: int, sampling: Sampling = Sampling(),
                    stop_at_eos: bool = True, stats_file: str | None = None,
                    plugin: CompressionPlugin | None = None) -> tuple[GenerationResult, dict]:
    """Generate with the streamed engine (``plugin``: compress the prompt); returns the result and the
    run's summary."""
    model.engine.stats.clear()
    result = generate(model.transformer, prompt, n, sampling, stop_at_eos, plugin=plugin)
    summary = summarize(model.engine.stats, model)
    if stats_file:
        tmp = f"{stats_file}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"summary": summary, "tokens": [s.to_dict() for s in model.engine.stats]}, f)
        os.replace(tmp, stats_file)
    return result, summary
