"""Open whatever ``-m`` names (a checkpoint folder or a .gguf file) as a dense model plus its tokenizer."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sparseflash.errors import CheckpointError
from sparseflash.model.checkpoint import load_checkpoint
from sparseflash.model.config import ModelConfig
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


def open_dense(path: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> DenseModel:
    """Load a checkpoint folder or .gguf file (None: the bundled default model) in float32.

    ``tokenizer`` (a tokenizer.json file) replaces the checkpoint's own tokenizer; for a GGUF the
    file's tokenizer is then not read at all (for a pre-tokenizer sparseflash cannot rebuild).
    """
    override = TextTokenizer.from_file(tokenizer) if tokenizer is not None else None
    if path is not None and str(path).endswith(".gguf"):
        from sparseflash.model.gguf_import import load_gguf

        g = load_gguf(path, tokenizer_json=override.to_json() if override else None)
        model = DenseModel(g.path, g.config, g.weights,
                           override or TextTokenizer.from_json(g.tokenizer_json, f"{g.path} tokenizer"))
    else:
        ckpt = load_checkpoint(path)
        model = DenseModel(ckpt.path, ckpt.config, ckpt.weights,
                           override or TextTokenizer.from_file(ckpt.tokenizer_path))
    if override is not None and override.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{tokenizer}: the tokenizer has {override.vocab_size} tokens but the model's "
                              f"embedding only {model.config.vocab_size}")
    return model


def stored_tensors(path: str | os.PathLike | None) -> list[dict]:
    """Each stored tensor's name, type and shape, read from headers only (no tensor data).

    GGUF: the GGML type (F32, Q4_K, ...), shape in torch order. HF folder: the safetensors dtype
    (F32, F16, BF16, ...). None: the bundled default model.
    """
    if path is not None and str(path).endswith(".gguf"):
        from sparseflash.model.gguf_tensors import GGUFTensors

        return [{"name": t.name, "type": t.type_name, "shape": list(t.shape)} for t in GGUFTensors(path)]
    from safetensors import SafetensorError, safe_open

    from sparseflash.model.checkpoint import default_model_dir, shard_files

    out = []
    for shard in shard_files(Path(path) if path is not None else default_model_dir()):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    out.append({"name": name, "type": s.get_dtype(), "shape": list(s.get_shape())})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: cannot read safetensors header ({str(e).splitlines()[0][:200]})") from None
    return out


def type_counts(tensors: list[dict]) -> dict[str, int]:
    """Stored type -> number of tensors, most common first."""
    return dict(Counter(t["type"] for t in tensors).most_common())


def model_summary(config: ModelConfig, weights: ModelWeights) -> dict:
    """Architecture and sizes: parameter counts and FFN bytes per layer for f32/f16 storage."""
    named = weights.named()
    seen, params = set(), 0
    for t in named.values():
        if id(t) not in seen:
            seen.add(id(t))
            params += t.numel()
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
        "tied_embeddings": weights.lm_head is weights.embed,
        "parameters": params,
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
