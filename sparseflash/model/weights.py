"""Model weights in sparseflash's canonical form, independent of where they were loaded from.

Linear weights keep the torch convention (out_features, in_features): ``w_up`` is (neurons, d),
``w_down`` is (d, neurons). FFN weights may be absent (None) when a runtime streams them. A
resident matrix may also be a packed (e.g. quantized) matrix object with ``shape``, ``device``,
``nbytes``, ``to(device)``, ``linear(x)`` (x @ W.T) and ``rows(ids)`` (an embedding lookup).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparseflash.model.config import ModelConfig

LAYER_FIELDS = ("attn_norm_w", "attn_norm_b", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "ffn_norm_w",
                "ffn_norm_b", "w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")
TOP_FIELDS = ("embed", "final_norm_w", "final_norm_b", "lm_head")


@dataclass
class LayerWeights:
    attn_norm_w: torch.Tensor
    attn_norm_b: torch.Tensor | None
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    ffn_norm_w: torch.Tensor
    ffn_norm_b: torch.Tensor | None
    w_up: torch.Tensor | None = None  # (neurons, d)
    w_gate: torch.Tensor | None = None  # (neurons, d), gated FFNs only
    w_down: torch.Tensor | None = None  # (d, neurons)
    b_up: torch.Tensor | None = None  # (neurons,)
    b_gate: torch.Tensor | None = None  # (neurons,)
    b_down: torch.Tensor | None = None  # (d,)

    def named(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device | str) -> LayerWeights:
        return LayerWeights(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)})


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (vocab, d)
    layers: list[LayerWeights]
    final_norm_w: torch.Tensor
    final_norm_b: torch.Tensor | None
    lm_head: torch.Tensor  # (vocab, d); the same tensor as embed when tied

    def parameter_count(self) -> int:
        """Values held (a tensor shared by two names, e.g. a tied head, counted once; packed quantized
        matrices count their logical shape)."""
        seen, count = set(), 0
        for t in self.named().values():
            if id(t) not in seen:
                seen.add(id(t))
                count += t.shape.numel()
        return count

    def named(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (``layers.{i}.{field}``), tied head included once as ``lm_head``."""
        out = {"embed": self.embed, "final_norm_w": self.final_norm_w, "lm_head": self.lm_head}
        if self.final_norm_b is not None:
            out["final_norm_b"] = self.final_norm_b
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v for k, v in layer.named().items()})
        return out

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, device: torch.device | str) -> ModelWeights:
        """The same weights on ``device`` (a tied head stays one tensor)."""
        embed = self.embed.to(device)
        head = embed if self.lm_head is self.embed else self.lm_head.to(device)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ModelWeights(embed, [layer.to(device) for layer in self.layers], move(self.final_norm_w),
                            move(self.final_norm_b), head)


def canonical_shapes(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str], dict[str, tuple[int, ...]], set[str]]:
    """What a checkpoint of ``config`` must hold, in canonical names.

    Returns (layer field -> shape, required layer fields, top-level field -> shape, required
    top-level fields). Fields not required are optional (biases the config does not ask for);
    fields absent from the shape maps (w_gate of a plain FFN) must not be present.
    """
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    d, n = c.hidden_size, c.intermediate_size
    layer = {
        "attn_norm_w": (d,), "attn_norm_b": (d,), "ffn_norm_w": (d,), "ffn_norm_b": (d,),
        "wq": (q_out, d), "wk": (kv_out, d), "wv": (kv_out, d), "wo": (d, q_out),
        "bq": (q_out,), "bk": (kv_out,), "bv": (kv_out,), "bo": (d,),
        "w_up": (n, d), "w_gate": (n, d), "w_down": (d, n), "b_up": (n,), "b_gate": (n,), "b_down": (d,),
    }
    if not c.gated:
        del layer["w_gate"], layer["b_gate"]
    required = {"attn_norm_w", "ffn_norm_w", "wq", "wk", "wv", "wo", "w_up", "w_down"} | ({"w_gate"} if c.gated else set())
    if c.norm == "layernorm1p":
        required |= {"attn_norm_b", "ffn_norm_b"}
    if c.attention_bias:
        required |= {"bq", "bk", "bv"}
    if c.mlp_bias:
        required |= {"b_up", "b_down"} | ({"b_gate"} if c.gated else set())
    top = {"embed": (c.vocab_size, d), "final_norm_w": (d,), "final_norm_b": (d,), "lm_head": (c.vocab_size, d)}
    top_required = {"embed", "final_norm_w"} | ({"final_norm_b"} if c.norm == "layernorm1p" else set()) \
        | (set() if c.tie_word_embeddings else {"lm_head"})
    return layer, required, top, top_required
