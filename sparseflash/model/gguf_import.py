"""Load a .gguf file (nemotron, arcee, llama) as canonical float32 weights.

The result is what the HF loader gives for the checkpoint the GGUF was made from: the same
ModelConfig, the same ModelWeights and the same tokenizer. Tensors come one at a time through
``GGUFTensors`` (gguf_tensors.py), which checks the file's structure first and dequantizes any
type gguf-py implements (F32/F16/BF16, Q4_0 ... Q8_0, the K-quants, IQ*, TQ*) to float32.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.config import ROPE_TYPES, ModelConfig
from sparseflash.model.gguf_mapping import (
    KEY_EOS_IDS,
    KEY_ROPE_SCALING,
    GGUFArch,
    gguf_arch,
    llama3_rope_factors,
)
from sparseflash.model.gguf_tensors import GGUFTensors
from sparseflash.model.gguf_tokenizer import tokenizer_json_from_ggml
from sparseflash.model.weights import ModelWeights

KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"
_INT_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}
_FLOAT_TYPES = {"FLOAT32", "FLOAT64"}
_REQUIRED = object()


@dataclass
class GGUFModel:
    """A loaded GGUF: config, canonical float32 weights and the tokenizer as tokenizer.json text."""

    path: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer_json: str
    tokenizer_rebuilt: bool  # True: rebuilt from tokenizer.ggml.*, not stored verbatim


class _Metadata:
    """Typed access to GGUF key/values; a wrong type or a missing required key is a CheckpointError."""

    def __init__(self, fields, path: Path):
        self.fields, self.path = fields, path

    def _get(self, key: str, kinds: set[str], what: str, default, array: bool = False):
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF key {key!r} is missing")
            return default
        types = [t.name for t in field.types]
        ok = (len(types) == 2 and types[0] == "ARRAY" and types[1] in kinds) if array else types[0] in kinds
        if not ok and not (array and types == ["ARRAY"]):  # an empty array has no item type
            raise CheckpointError(f"{self.path}: GGUF key {key!r} has type {'/'.join(types)}, expected {what}")
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: GGUF key {key!r} is not valid UTF-8") from None

    def int(self, key: str, default=_REQUIRED, minimum: int = 1) -> int:
        value = self._get(key, _INT_TYPES, "an integer", default)
        if value is not default and (isinstance(value, bool) or value < minimum):
            raise CheckpointError(f"{self.path}: GGUF key {key!r} is {value}, expected an integer >= {minimum}")
        return value

    def float(self, key: str, default=_REQUIRED) -> float:
        value = self._get(key, _FLOAT_TYPES, "a float", default)
        if value is default:
            return value
        if not math.isfinite(value):
            raise CheckpointError(f"{self.path}: GGUF key {key!r} is {value}")
        if self.fields[key].types[0].name == "FLOAT32":
            return float(str(np.float32(value)))  # the decimal that was written: 1e-05, not 9.99999975e-06
        return float(value)

    def str(self, key: str, default=_REQUIRED) -> str:
        return self._get(key, {"STRING"}, "a string", default)

    def bool(self, key: str, default: bool) -> bool:
        return bool(self._get(key, {"BOOL"}, "a bool", default))

    def list(self, key: str, kinds: set[str], what: str, default=_REQUIRED) -> list:
        return self._get(key, kinds, f"an array of {what}", default, array=True)


def _rotary_factor(rot: int, head_dim: int) -> float:
    """partial_rotary_factor with int(head_dim * factor) == rot despite float rounding."""
    factor = rot / head_dim
    while int(head_dim * factor) < rot:
        factor = math.nextafter(factor, 2.0)
    return factor


def _rope_scaling(meta: _Metadata, prefix: str) -> dict:
    raw = meta.str(KEY_ROPE_SCALING, None)
    if raw is not None:
        try:
            scaling = json.loads(raw)
        except json.JSONDecodeError:
            scaling = None
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_TYPES:
            raise CheckpointError(f"{meta.path}: {KEY_ROPE_SCALING} is not a known RoPE scaling: {raw[:100]!r}")
        return scaling
    kind = meta.str(prefix + "rope.scaling.type", "none")
    factor = meta.float(prefix + "rope.scaling.factor", None)
    if factor is None:
        factor = meta.float(prefix + "rope.scale_linear", None)
    if kind == "none" or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return {"rope_type": "default"}
    if factor is None or factor <= 0:
        raise CheckpointError(f"{meta.path}: RoPE scaling {kind!r} without a positive {prefix}rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": meta.int(prefix + "rope.scaling.original_context_length")}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.float(prefix + "rope.scaling." + key, None)) is not None:
                out[name] = value
        return out
    raise UnsupportedModelError(f"{meta.path}: RoPE scaling {kind!r} is not supported (supported: none, linear, yarn)")


def _config(meta: _Metadata, arch_name: str, arch: GGUFArch, tensors: GGUFTensors) -> ModelConfig:
    p = f"{arch_name}."
    hidden = meta.int(p + "embedding_length")
    heads = meta.int(p + "attention.head_count")
    head_dim = meta.int(p + "attention.key_length", hidden // heads)
    if head_dim < 1:
        raise CheckpointError(f"{meta.path}: head size {hidden} // {heads} is 0; {p}attention.key_length is missing")
    if meta.int(p + "attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{meta.path}: key and value head sizes differ; not supported")
    rot = meta.int(p + "rope.dimension_count", head_dim)
    if rot % 2 or not 0 < rot <= head_dim:
        raise CheckpointError(f"{meta.path}: rope.dimension_count {rot} is invalid for heads of {head_dim}")
    layers = meta.int(p + "block_count")
    if layers > len(tensors):
        raise CheckpointError(f"{meta.path}: block_count {layers} exceeds the {len(tensors)} tensors in the file")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    vocab = tensors.info("token_embd.weight").shape[0]  # torch order: (vocab, hidden)
    if meta.int(p + "vocab_size", vocab) != vocab:
        raise CheckpointError(f"{meta.path}: {p}vocab_size disagrees with token_embd.weight ({vocab} rows)")
    eos = meta.int("tokenizer.ggml.eos_token_id", None, minimum=0)
    eos_list = meta.list(KEY_EOS_IDS, _INT_TYPES, "integers", None)
    scaling = _rope_scaling(meta, p)
    return ModelConfig(
        arch=arch_name,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.int(p + "feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=meta.int(p + "attention.head_count_kv", heads),
        head_dim=head_dim,
        activation=arch.activation,
        gated=arch.gated,
        norm=arch.norm,
        norm_eps=meta.float(p + "attention." + arch.eps_key),
        rope_theta=meta.float(p + "rope.freq_base", 10000.0),
        partial_rotary_factor=_rotary_factor(rot, head_dim),
        rope_scaling=scaling,
        max_position_embeddings=meta.int(p + "context_length"),
        tie_word_embeddings="output.weight" not in tensors,  # refined by _weights once the data is read
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=meta.int("tokenizer.ggml.bos_token_id", None, minimum=0),
        eos_token_id=list(eos_list) if eos_list else eos,
    )


def _check_config(config: ModelConfig, path: Path) -> None:
    c = config
    if c.num_heads % c.num_kv_heads:
        raise CheckpointError(f"{path}: head_count {c.num_heads} is not a multiple of head_count_kv {c.num_kv_heads}")
    arch = gguf_arch(c.arch)
    if arch.permute_qk and c.rotary_dim != c.head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary ({c.rotary_dim} of {c.head_dim}) with {c.arch} RoPE")
    if arch.permute_qk and c.head_dim % 2:
        raise CheckpointError(f"{path}: head size {c.head_dim} is odd")


def _tokenizer_json(meta: _Metadata) -> tuple[str, bool]:
    text = meta.str(KEY_TOKENIZER_JSON, None)
    if text is not None:
        return text, False
    model = meta.str("tokenizer.ggml.model", None)
    if model is None:
        raise CheckpointError(f"{meta.path}: the GGUF has no tokenizer (neither {KEY_TOKENIZER_JSON} "
                              f"nor tokenizer.ggml.*)")
    text = tokenizer_json_from_ggml(
        model=model,
        pre=meta.str("tokenizer.ggml.pre", None),
        tokens=meta.list("tokenizer.ggml.tokens", {"STRING"}, "strings"),
        token_types=meta.list("tokenizer.ggml.token_type", _INT_TYPES, "integers"),
        merges=meta.list("tokenizer.ggml.merges", {"STRING"}, "strings", []),
        bos_id=meta.int("tokenizer.ggml.bos_token_id", None, minimum=0),
        add_bos=meta.bool("tokenizer.ggml.add_bos_token", False),
        source=str(meta.path),
    )
    return text, True


def load_gguf(path: str | os.PathLike, tokenizer_json: str | None = None) -> GGUFModel:
    """Load a GGUF file into a ModelConfig, canonical float32 weights and tokenizer.json text.

    Tensors of any type gguf-py dequantizes are read one at a time (gguf_source.GGUFSource) and
    converted to float32. ``tokenizer_json`` (tokenizer.json text) replaces the GGUF's own
    tokenizer, which is then not read.
    """
    from sparseflash.model.gguf_source import GGUFSource

    source = GGUFSource(path, tokenizer_json)
    try:
        weights = source.materialize()
    finally:
        source.close()
    return GGUFModel(source.path, source.config, weights, source.tokenizer_json, source.tokenizer_rebuilt)


def _check_rope_freqs(freqs: torch.Tensor, config: ModelConfig, path: Path) -> None:
    """rope_freqs must be what the config's RoPE implies (all ones unless llama3 scaling)."""
    if config.rope_scaling.get("rope_type") == "llama3":
        expected = llama3_rope_factors(config)
    else:
        expected = torch.ones(config.rotary_dim // 2)
    if freqs.shape != expected.shape or not torch.allclose(freqs, expected, rtol=1e-5, atol=0):
        raise UnsupportedModelError(
            f"{path}: tensor 'rope_freqs.weight' holds per-frequency RoPE factors that sparseflash cannot "
            f"express (no {KEY_ROPE_SCALING} key describing them)")
