"""Hugging Face checkpoint folders (config.json, safetensors shards, tokenizer.json): names, hashing,
and the eager loader ``load_checkpoint`` (every tensor at once; the lazy path is
safetensors_source.py, and ``load_checkpoint`` runs its checks first)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.config import ModelConfig, config_from_hf
from sparseflash.model.weights import LayerWeights, ModelWeights, canonical_shapes

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
HF_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm_w": "model.norm.weight",
                "final_norm_b": "model.norm.bias", "lm_head": "lm_head.weight"}


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


def file_hash(path: str | os.PathLike) -> str:
    """sha256 over one file's bytes; hex, 16 chars (a GGUF checkpoint; prepare's calibration texts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def checkpoint_hash(folder: str | os.PathLike) -> str:
    """sha256 over config.json and every safetensors shard (content, in name order); hex, 16 chars.

    A .gguf file is hashed whole.
    """
    if str(folder).endswith(".gguf"):
        return file_hash(folder)
    folder = Path(folder)
    h = hashlib.sha256()
    for path in [folder / "config.json", *shard_files(folder)]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_checkpoint(folder: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a HF checkpoint folder eagerly into canonical weights of ``dtype``; None loads the bundled model.

    Every shard is read whole (safetensors' own loader), after the lazy source's header checks.
    Meant for small models and as the independent reference of the lazy path in tests.
    """
    from sparseflash.model.safetensors_source import SafetensorsSource

    folder = Path(folder) if folder is not None else default_model_dir()
    SafetensorsSource(folder).close()  # the structural checks, from headers only
    config = config_from_hf(_read_json(folder / "config.json", "config.json"))
    tokenizer_path = folder / "tokenizer.json"
    raw = _load_tensors(shard_files(folder))
    weights = weights_from_hf(config, raw, dtype, source=str(folder))
    return Checkpoint(path=folder, config=config, weights=weights, tokenizer_path=tokenizer_path)


def weights_from_hf(
    config: ModelConfig, raw: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, source: str = "checkpoint"
) -> ModelWeights:
    """Map HF tensor names to canonical weights, checking presence and shapes."""
    layer_shapes, layer_required, top_shapes, top_required = canonical_shapes(config)

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
    for i in range(config.num_layers):
        fields_ = {key: take(f"model.layers.{i}.{HF_LAYER_NAMES[key]}", shape, key in layer_required)
                   for key, shape in layer_shapes.items()}
        layers.append(LayerWeights(**fields_))
    top = {key: take(HF_TOP_NAMES[key], shape, key in top_required) for key, shape in top_shapes.items()
           if key != "lm_head" or not config.tie_word_embeddings}
    return ModelWeights(embed=top["embed"], layers=layers, final_norm_w=top["final_norm_w"],
                        final_norm_b=top["final_norm_b"], lm_head=top.get("lm_head", top["embed"]))
