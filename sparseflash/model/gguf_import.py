"""Load a .gguf file (nemotron, arcee, llama) as canonical float32 weights.

The result is what the HF loader gives for the checkpoint the GGUF was made from: the same
ModelConfig, the same ModelWeights and the same tokenizer. Tensors come one at a time through
``GGUFTensors`` (gguf_tensors.py), which checks the file's structure first and dequantizes any
type gguf-py implements (F32/F16/BF16, Q4_0 ... Q8_0, the K-quants, IQ*, TQ*) to float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.checkpoint import HF_LAYER_NAMES, weights_from_hf
from sparseflash.model.config import ROPE_TYPES, ModelConfig
from sparseflash.model.gguf_mapping import (
    GGUF_LAYER_NAMES,
    GGUF_TOP_NAMES,
    KEY_EOS_IDS,
    KEY_ROPE_SCALING,
    ROPE_FREQS,
    GGUFArch,
    from_gguf_tensor,
    gguf_arch,
    llama3_rope_factors,
)
from sparseflash.model.gguf_tensors import GGUFTensors
from sparseflash.model.gguf_tokenizer import tokenizer_json_from_ggml
from sparseflash.model.weights import ModelWeights

KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"
HF_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm_w": "model.norm.weight",
                "final_norm_b": "model.norm.bias", "lm_head": "lm_head.weight"}
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


def gguf_hash(path: str | os.PathLike) -> str:
    """sha256 over the file's bytes; hex, 16 chars (the GGUF counterpart of checkpoint_hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


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


def _canonical_name(name: str, arch: GGUFArch, layers: int) -> tuple[str, int | None] | None:
    """(canonical field, layer or None) for a GGUF tensor name this arch uses, else None."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        field = next((f for f, g in GGUF_LAYER_NAMES.items() if g == suffix), None)
        return (field, i) if field in arch.layer_fields and i < layers else None
    field = next((f for f, g in GGUF_TOP_NAMES.items() if g == name), None)
    if field == "final_norm_b" and arch.norm != "layernorm1p":
        return None
    return (field, None) if field else None


def _weights(tensors: GGUFTensors, config: ModelConfig, arch: GGUFArch, path: Path) -> tuple[ModelWeights, ModelConfig]:
    """Canonical float32 weights (read tensor by tensor), and the config with tie_word_embeddings set from the data.

    llama.cpp's nemotron always needs output.weight, so a tied model is written with a copy of
    token_embd; an output head equal to the embedding is therefore read back as tied.
    """
    raw: dict[str, torch.Tensor] = {}
    unknown = []
    fields = {}
    for name in tensors.names():
        if name == ROPE_FREQS:
            continue
        where = _canonical_name(name, arch, config.num_layers)
        if where is None:
            unknown.append(name)
        else:
            fields[name] = where
    if unknown:
        raise UnsupportedModelError(f"{path}: tensors llama.cpp's {config.arch} architecture does not have: "
                                    f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    tensors.check_types(fields)  # an unreadable type fails before any data is read
    for name, (field, i) in fields.items():
        hf = HF_TOP_NAMES[field] if i is None else f"model.layers.{i}.{HF_LAYER_NAMES[field]}"
        raw[hf] = from_gguf_tensor(arch, config, field, tensors.load(name))
    head = raw.pop(HF_TOP_NAMES["lm_head"], None)
    tied = head is None or torch.equal(head, raw.get(HF_TOP_NAMES["embed"], head))
    if not tied:
        raw[HF_TOP_NAMES["lm_head"]] = head
    config = dataclasses.replace(config, tie_word_embeddings=tied)
    try:
        weights = weights_from_hf(config, raw, source=str(path))
    except CheckpointError as e:  # name the tensor as it is called in the GGUF file
        raise type(e)(re.sub(r"'([\w.]+)'", lambda m: f"'{_gguf_name(m.group(1))}'", str(e))) from None
    return weights, config


def _gguf_name(hf: str) -> str:
    """GGUF name of a HF tensor name (unchanged if it is not one)."""
    top = {h: GGUF_TOP_NAMES[f] for f, h in HF_TOP_NAMES.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    field = next((f for f, h in HF_LAYER_NAMES.items() if m and h == m.group(2)), None)
    return f"blk.{m.group(1)}.{GGUF_LAYER_NAMES[field]}" if field else top.get(hf, hf)


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

    Tensors of any type gguf-py dequantizes are read one at a time and converted to float32.
    ``tokenizer_json`` (tokenizer.json text) replaces the GGUF's own tokenizer, which is then not read.
    """
    path = Path(path)
    tensors = GGUFTensors(path)
    meta = _Metadata(tensors.reader.fields, path)
    arch_name = meta.str("general.architecture")
    arch = gguf_arch(arch_name)
    config = _config(meta, arch_name, arch, tensors)
    _check_config(config, path)
    if tokenizer_json is None:  # before the weights: an unknown tokenizer fails fast
        tokenizer_json, rebuilt = _tokenizer_json(meta)
    else:
        rebuilt = False
    weights, config = _weights(tensors, config, arch, path)
    if ROPE_FREQS in tensors:
        _check_rope_freqs(tensors.load(ROPE_FREQS), config, path)
    return GGUFModel(path, config, weights, tokenizer_json, rebuilt)


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
