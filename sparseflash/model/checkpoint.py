"""Load Hugging Face checkpoint folders (config.json, safetensors shards, tokenizer.json)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.config import ModelConfig, config_from_hf
from sparseflash.model.weights import LayerWeights, ModelWeights

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# canonical field -> HF tensor name (within model.layers.{i}.)
HF_LAYER_NAMES = {
    "attn_norm_w": "input_layernorm.weight",
    "attn_norm_b": "input_layernorm.bias",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
    "ffn_norm_w": "post_attention_layernorm.weight",
    "ffn_norm_b": "post_attention_layernorm.bias",
    "w_up": "mlp.up_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "b_up": "mlp.up_proj.bias",
    "b_gate": "mlp.gate_proj.bias",
    "b_down": "mlp.down_proj.bias",
}


def default_model_dir() -> Path:
    """The bundled default checkpoint (package data)."""
    return Path(__file__).resolve().parent.parent / "models" / "tiny-relu2"


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, canonical weights (float32 unless asked otherwise), tokenizer path."""

    path: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer_path: Path


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return out


def shard_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map is missing or empty")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS_SINGLE
    if single.exists():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if not others:
        raise CheckpointError(f"{folder}: no model.safetensors or {SAFETENSORS_INDEX} found")
    return others


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{path}: safetensors shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: cannot read safetensors file ({msg}); is it truncated or corrupt?") from None
    return tensors


def checkpoint_hash(folder: str | os.PathLike) -> str:
    """sha256 over config.json and every safetensors shard (content, in name order); hex, 16 chars.

    A .gguf file is hashed whole.
    """
    if str(folder).endswith(".gguf"):
        from sparseflash.model.gguf_import import gguf_hash

        return gguf_hash(folder)
    folder = Path(folder)
    h = hashlib.sha256()
    for path in [folder / "config.json", *shard_files(folder)]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_checkpoint(folder: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a HF checkpoint folder into canonical weights of ``dtype``; None loads the bundled model."""
    folder = Path(folder) if folder is not None else default_model_dir()
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected config.json, safetensors, tokenizer.json)")
    config = config_from_hf(_read_json(folder / "config.json", "config.json"))
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise CheckpointError(f"{folder}: tokenizer.json not found (sparseflash needs the HF fast-tokenizer file)")
    raw = _load_tensors(shard_files(folder))
    weights = weights_from_hf(config, raw, dtype, source=str(folder))
    return Checkpoint(path=folder, config=config, weights=weights, tokenizer_path=tokenizer_path)


def weights_from_hf(
    config: ModelConfig, raw: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, source: str = "checkpoint"
) -> ModelWeights:
    """Map HF tensor names to canonical weights, checking presence and shapes."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    d, n = c.hidden_size, c.intermediate_size
    shapes = {
        "attn_norm_w": (d,), "attn_norm_b": (d,), "ffn_norm_w": (d,), "ffn_norm_b": (d,),
        "wq": (q_out, d), "wk": (kv_out, d), "wv": (kv_out, d), "wo": (d, q_out),
        "bq": (q_out,), "bk": (kv_out,), "bv": (kv_out,), "bo": (d,),
        "w_up": (n, d), "w_gate": (n, d), "w_down": (d, n), "b_up": (n,), "b_gate": (n,), "b_down": (d,),
    }
    optional = {"bq", "bk", "bv", "bo", "b_up", "b_gate", "b_down", "attn_norm_b", "ffn_norm_b"}
    needs_bias = c.norm == "layernorm1p"
    required_bias = {"attn_norm_b", "ffn_norm_b"} if needs_bias else set()
    if c.attention_bias:
        required_bias |= {"bq", "bk", "bv"}
    if c.mlp_bias:
        required_bias |= {"b_up", "b_down"} | ({"b_gate"} if c.gated else set())

    def take(name: str, shape: tuple[int, ...], required: bool = True) -> torch.Tensor | None:
        t = raw.get(name)
        if t is None:
            if required:
                raise CheckpointError(f"{source}: tensor {name!r} is missing")
            return None
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in LOADABLE_DTYPES:
            raise UnsupportedModelError(f"{source}: tensor {name!r} has dtype {t.dtype} (supported: f32, f16, bf16)")
        return t.to(dtype).contiguous()

    layers = []
    for i in range(c.num_layers):
        fields_ = {}
        for key, hf in HF_LAYER_NAMES.items():
            if key == "w_gate" and not c.gated:
                continue
            if key == "b_gate" and not c.gated:
                continue
            required = key not in optional or key in required_bias
            fields_[key] = take(f"model.layers.{i}.{hf}", shapes[key], required)
        layers.append(LayerWeights(**fields_))
    embed = take("model.embed_tokens.weight", (c.vocab_size, d))
    head = embed if c.tie_word_embeddings else take("lm_head.weight", (c.vocab_size, d))
    return ModelWeights(
        embed=embed,
        layers=layers,
        final_norm_w=take("model.norm.weight", (d,)),
        final_norm_b=take("model.norm.bias", (d,), required=needs_bias),
        lm_head=head,
    )
