"""Open whatever ``-m`` names (a checkpoint folder or a .gguf file) as a dense model plus its tokenizer."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseflash.model.config import ModelConfig
from sparseflash.model.source import CheckpointSource, open_source
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.transformer import Transformer
from sparseflash.model.weights import ModelWeights


@dataclass
class DenseModel:
    """A dense in-memory model ready to run."""

    source: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer: TextTokenizer

    def transformer(self, ffn=None) -> Transformer:
        return Transformer(self.config, self.weights, ffn)


def open_dense(path: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None,
               lazy: bool | None = False) -> DenseModel:
    """A checkpoint folder or .gguf file (None: the bundled default model) as a dense float32 model.

    ``tokenizer`` (a tokenizer.json file) replaces the checkpoint's own tokenizer; for a GGUF the
    file's tokenizer is then not read at all (for a pre-tokenizer sparseflash cannot rebuild).
    Every tensor is read now, unless ``lazy``: then each layer is read when a forward reaches it and
    dropped when the next one is read (source.LazyLayers), so a model larger than memory runs with
    one layer in memory (slowly: every forward reads the whole checkpoint). ``lazy=None`` chooses:
    lazy when the float32 weights would take more than half the memory available now.
    """
    source = open_source(path, tokenizer)
    if lazy is None:
        import psutil

        lazy = source.parameter_count() * 4 > psutil.virtual_memory().available // 2
    if lazy:
        weights = source.lazy_weights(torch.float32, keep_all=False)
    else:
        try:
            weights = source.materialize(torch.float32)
        finally:
            source.close()
    return DenseModel(source.path, source.config, weights, source.tokenizer())


def stored_tensors(path: str | os.PathLike | None) -> list[dict]:
    """Each stored tensor's name, type and shape, read from headers only (no tensor data).

    GGUF: the GGML type (F32, Q4_K, ...), shape in torch order. HF folder: the safetensors dtype
    (F32, F16, BF16, ...). None: the bundled default model.
    """
    with open_source(path) as source:
        return source.tensor_list()


def type_counts(tensors: list[dict]) -> dict[str, int]:
    """Stored type -> number of tensors, most common first."""
    return dict(Counter(t["type"] for t in tensors).most_common())


def model_summary(source: CheckpointSource) -> dict:
    """Architecture and sizes from the checkpoint's headers: parameter counts and FFN bytes per layer
    for f32/f16 storage."""
    config = source.config
    params = source.parameter_count()
    ffn_values = config.ffn_param_count()
    return {
        "arch": config.arch,
        "ffn_kind": config.ffn_kind,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_neurons": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context": config.max_position_embeddings,
        "norm": config.norm,
        "rotary_dim": config.rotary_dim,
        "tied_embeddings": source.tied,
        "parameters": params,
        "stored_bytes": source.stored_bytes(),
        "ffn_parameters": ffn_values * config.num_layers,
        "ffn_share": ffn_values * config.num_layers / params,
        "ffn_bytes_per_layer": {"f32": ffn_values * 4, "f16": ffn_values * 2},
        "bundle_bytes": {"f32": ffn_values // config.intermediate_size * 4,
                         "f16": ffn_values // config.intermediate_size * 2},
    }


def summary_text(s: dict) -> str:
    """model_summary's dict (plus ``source``) as a few lines."""
    from sparseflash.units import fmt_bytes

    return "\n".join([
        f"model:        {s['source']}",
        f"architecture: {s['arch']} ({s['ffn_kind']} FFN, {s['norm']}, rotary dim {s['rotary_dim']})",
        f"shape:        {s['layers']} layers, hidden {s['hidden_size']}, {s['ffn_neurons']} FFN neurons/layer, "
        f"{s['heads']} heads ({s['kv_heads']} kv) of {s['head_dim']}, vocab {s['vocab_size']}, context {s['context']}",
        f"parameters:   {s['parameters']:,} ({s['ffn_share']:.1%} in FFNs), tied embeddings: {s['tied_embeddings']}",
        f"FFN bytes:    {fmt_bytes(s['ffn_bytes_per_layer']['f16'])}/layer in f16, "
        f"{fmt_bytes(s['ffn_bytes_per_layer']['f32'])}/layer in f32; bundle {s['bundle_bytes']['f16']} B (f16)",
        f"tensor types: {', '.join(f'{n} {kind}' for kind, n in s.get('tensor_types', {}).items())}"])
