"""llama.cpp's GGUF conventions for nemotron, arcee and llama, in both directions.

What differs from a Hugging Face checkpoint (as convert_hf_to_gguf.py writes it):
- Tensor names: ``blk.{i}.attn_q.weight``, ``ffn_up``, ``token_embd``, ``output_norm``, ... .
- Nemotron's LayerNorm1P: GGUF stores the effective norm weight ``w + 1`` (llama.cpp then runs a
  plain LayerNorm); sparseflash keeps the raw ``w`` and adds 1 at run time.
- Llama and arcee use llama.cpp's "normal" RoPE, which rotates adjacent pairs (0,1), (2,3), ...;
  HF rotates halves (i, i + head_dim/2). The converter permutes the rows of q_proj and k_proj
  (weights and biases) within each head so that both give the same result. Nemotron uses the
  NeoX (halves) RoPE and is not permuted.
- Shapes: GGUF lists dimensions innermost first (ne[0] = in_features); GGUFReader and GGUFWriter
  reverse them, so arrays keep the torch (out_features, in_features) order.
- Hyperparameters live under ``{arch}.*`` keys; everything GGUF has no key for is kept under
  ``sparseflash.*`` keys that llama.cpp ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseflash.errors import UnsupportedModelError
from sparseflash.model.config import ModelConfig

# canonical LayerWeights field -> GGUF tensor name within blk.{i}.
GGUF_LAYER_NAMES = {
    "attn_norm_w": "attn_norm.weight", "attn_norm_b": "attn_norm.bias",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "bo": "attn_output.bias",
    "ffn_norm_w": "ffn_norm.weight", "ffn_norm_b": "ffn_norm.bias",
    "w_up": "ffn_up.weight", "w_gate": "ffn_gate.weight", "w_down": "ffn_down.weight",
    "b_up": "ffn_up.bias", "b_gate": "ffn_gate.bias", "b_down": "ffn_down.bias",
}
# canonical ModelWeights field -> GGUF tensor name
GGUF_TOP_NAMES = {"embed": "token_embd.weight", "final_norm_w": "output_norm.weight",
                  "final_norm_b": "output_norm.bias", "lm_head": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"

# sparseflash keys for what GGUF has no standard key for
KEY_ROPE_SCALING = "sparseflash.rope_scaling"  # JSON of ModelConfig.rope_scaling
KEY_EOS_IDS = "sparseflash.eos_token_ids"  # when the checkpoint lists several end tokens
KEY_SOURCE = "sparseflash.source"
KEY_SOURCE_HASH = "sparseflash.source_hash"


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp runs one architecture: FFN, norm, RoPE style and the tensors it can load."""

    activation: str
    gated: bool
    norm: str
    eps_key: str  # key under {arch}.attention.
    permute_qk: bool  # "normal" (adjacent-pair) RoPE: q/k rows permuted from the HF order
    layer_fields: frozenset[str]  # canonical layer tensors llama.cpp reads for this arch
    output_required: bool  # False: a missing output.weight means tied embeddings


_ATTN = {"attn_norm_w", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "ffn_norm_w", "w_up", "w_down"}
GGUF_ARCHS = {
    "nemotron": GGUFArch("relu2", False, "layernorm1p", "layer_norm_epsilon", False,
                         frozenset(_ATTN | {"attn_norm_b", "ffn_norm_b", "bo", "b_up", "b_down"}), True),
    "arcee": GGUFArch("relu2", False, "rmsnorm", "layer_norm_rms_epsilon", True, frozenset(_ATTN), False),
    "llama": GGUFArch("silu", True, "rmsnorm", "layer_norm_rms_epsilon", True,
                      frozenset(_ATTN | {"bo", "w_gate", "b_up", "b_gate", "b_down"}), False),
}


def gguf_arch(name: str) -> GGUFArch:
    if name not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {name!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHS))})")
    return GGUF_ARCHS[name]


def check_exportable(config: ModelConfig, present: set[str]) -> GGUFArch:
    """The llama.cpp architecture for ``config``, or UnsupportedModelError saying why there is none.

    ``present`` holds the canonical layer fields the checkpoint has (biases are optional).
    """
    c = config
    arch = gguf_arch(c.arch)
    if (c.activation, c.gated) != (arch.activation, arch.gated):
        raise UnsupportedModelError(
            f"llama.cpp's {c.arch} architecture computes a {'silu-gated' if arch.gated else arch.activation} FFN; "
            f"this checkpoint's {c.ffn_kind} FFN cannot be expressed in GGUF for llama.cpp")
    if arch.permute_qk and c.rotary_dim != c.head_dim:
        raise UnsupportedModelError(
            f"llama.cpp's {c.arch} architecture rotates the whole head; partial rotary "
            f"({c.rotary_dim} of {c.head_dim}) is not supported")
    if c.arch == "nemotron" and c.num_heads * c.head_dim != c.hidden_size:
        raise UnsupportedModelError(
            f"llama.cpp's nemotron architecture needs heads x head_dim == hidden_size "
            f"({c.num_heads} x {c.head_dim} = {c.num_heads * c.head_dim}, hidden_size {c.hidden_size})")
    if c.sliding_window is not None:
        raise UnsupportedModelError("sliding-window attention is not supported in GGUF export")
    extra = sorted(present - arch.layer_fields)
    if extra:
        names = ", ".join(GGUF_LAYER_NAMES[f] for f in extra)
        raise UnsupportedModelError(f"llama.cpp's {c.arch} architecture has no tensor for {names}")
    if c.rope_scaling.get("rope_type", "default") == "llama3" and not arch.permute_qk:
        raise UnsupportedModelError(f"llama3 RoPE scaling is not supported for {c.arch} in llama.cpp")
    return arch


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rows (half-split RoPE) -> llama.cpp rows (adjacent-pair RoPE), per head; weights or biases."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``permute_qk``."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_tensor(arch: GGUFArch, config: ModelConfig, field: str, t: torch.Tensor) -> torch.Tensor:
    """One canonical tensor in llama.cpp's convention (float32)."""
    t = t.float()
    if arch.norm == "layernorm1p" and field in ("attn_norm_w", "ffn_norm_w", "final_norm_w"):
        return t + 1.0  # the effective weight, in float32 exactly as the engine computes it
    if arch.permute_qk and field in ("wq", "bq"):
        return permute_qk(t, config.num_heads)
    if arch.permute_qk and field in ("wk", "bk"):
        return permute_qk(t, config.num_kv_heads)
    return t


def from_gguf_tensor(arch: GGUFArch, config: ModelConfig, field: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_gguf_tensor``."""
    t = t.float()
    if arch.norm == "layernorm1p" and field in ("attn_norm_w", "ffn_norm_w", "final_norm_w"):
        return t - 1.0
    if arch.permute_qk and field in ("wq", "bq"):
        return unpermute_qk(t, config.num_heads)
    if arch.permute_qk and field in ("wk", "bk"):
        return unpermute_qk(t, config.num_kv_heads)
    return t


def llama3_rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs tensor: per-frequency divisors (rotary_dim / 2,) of the plain RoPE."""
    import dataclasses

    from sparseflash.model.config import rope_inv_freq

    plain, _ = rope_inv_freq(dataclasses.replace(config, rope_scaling={"rope_type": "default"}))
    scaled, _ = rope_inv_freq(config)
    return (plain / scaled).float()
