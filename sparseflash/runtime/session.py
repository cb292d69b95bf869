"""Open a layout file for streamed generation and report what it cost."""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field

from sparseflash.model.generate import GenerationResult, Sampling, generate
from sparseflash.model.plugin import CompressionPlugin, load_plugin
from sparseflash.model.transformer import Transformer
from sparseflash.runtime.engine import StreamingFFN, TokenStats
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import LayoutModel, open_layout
from sparseflash.runtime.policy import Policy, parse_budget, parse_ffn_share


def layout_weight_bytes(lm: LayoutModel) -> int:
    """Bytes of the model's weights as stored in the layout (resident tensors + FFN regions)."""
    return sum(t.nbytes for t in lm.file.tensors.values()) + sum(r.length for r in lm.file.layers)


def ffn_bytes(lm: LayoutModel) -> int:
    return sum(r.n_neurons * r.bundle_bytes for r in lm.file.layers)


@dataclass
class StreamedModel:
    layout: LayoutModel
    engine: StreamingFFN
    transformer: Transformer
    plugins: list[CompressionPlugin] = field(default_factory=list)  # resident, counted in the budget

    @property
    def tokenizer(self):
        return self.layout.tokenizer

    def close(self) -> None:
        self.engine.close()
        self.layout.close()


def layout_plugins(lm: LayoutModel, paths: Sequence[str | os.PathLike]) -> list[CompressionPlugin]:
    """Load compression plugins for a layout, refusing any made from another checkpoint."""
    source = lm.header.get("source_hash") or ""
    if paths and not source:
        from sparseflash.model.plugin import PluginError

        raise PluginError(f"{lm.path}: the layout records no source checkpoint hash, so plugins cannot be checked "
                          "against it; rebuild it with `sparseflash prepare` or `sparseflash layout`")
    return [load_plugin(p, source, lm.config.num_layers, lm.config.hidden_size) for p in paths]


def open_streamed(path: str | os.PathLike, budget: str | int, verify: bool = False, backend: str = "cpu",
                  disk: DeviceModel | None = None, plugins: Sequence[str | os.PathLike] = (),
                  **policy) -> StreamedModel:
    """A transformer whose FFNs stream from ``path`` under ``budget`` (bytes, '2GiB' or '40%');
    ``plugins`` (files) are loaded, checked against the layout's source and counted as resident."""
    lm = open_layout(path, verify=verify)
    try:
        loaded = layout_plugins(lm, plugins)
        if disk is None:
            from sparseflash.runtime.diskprobe import device_model_for

            disk = device_model_for(path)
        share = None if isinstance(budget, int) else parse_ffn_share(budget)
        if share is not None:
            policy["ffn_share"] = share
            budget_bytes = 0
        else:
            budget_bytes = budget if isinstance(budget, int) else parse_budget(budget, layout_weight_bytes(lm))
        engine = StreamingFFN(lm, Policy(budget_bytes=budget_bytes, **policy), disk, backend,
                              extra_resident_bytes=sum(p.nbytes for p in loaded))
    except BaseException:
        lm.close()
        raise
    transformer = Transformer(lm.config, lm.weights, engine)
    for p in loaded:
        p.to(transformer.device)
    return StreamedModel(lm, engine, transformer, loaded)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(stats: list[TokenStats], model: StreamedModel, result: GenerationResult | None = None) -> dict:
    """Totals over generation: bytes read (vs dense streaming), requests, hits, times."""
    decode = stats[1:] if len(stats) > 1 else stats
    dense = ffn_bytes(model.layout)
    total = lambda key, rows=stats: sum(getattr(s, key) for s in rows)  # noqa: E731
    per_token = total("bytes_read", decode) / max(len(decode), 1)
    looked_up = total("hits") + total("misses")
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
        "budget_bytes": model.engine.memory.budget,
        "plugin_bytes": sum(p.nbytes for p in model.plugins),
        "memory_plan": {k: getattr(model.engine.memory, k) for k in
                        ("resident", "predictors", "hot", "cache", "index", "io_buffers", "slots_per_layer", "minimum")},
        "direct_io": model.engine.reader.direct,
        "device": {"ffn": model.engine.policy.device, "resident": model.transformer.device.type},
        "strategy": model.engine.strategy,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if model.engine.device_bytes_before is not None:  # a real GPU: what the run added to device memory
        from sparseflash.runtime.gpu import device_bytes_in_use

        out["device_bytes_used"] = device_bytes_in_use() - model.engine.device_bytes_before
    return out


def stream_generate(model: StreamedModel, prompt: list[int], n: int, sampling: Sampling = Sampling(),
                    stop_at_eos: bool = True, stats_file: str | None = None,
                    plugin: CompressionPlugin | None = None) -> tuple[GenerationResult, dict]:
    """Generate with the streamed engine (``plugin``: compress the prompt); returns the result and the
    run's summary."""
    model.engine.stats.clear()
    result = generate(model.transformer, prompt, n, sampling, stop_at_eos, plugin=plugin)
    summary = summarize(model.engine.stats, model, result)
    if stats_file:
        tmp = f"{stats_file}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"summary": summary, "tokens": [s.to_dict() for s in model.engine.stats]}, f)
        os.replace(tmp, stats_file)
    return result, summary
