"""Model weights in sparseflash's canonical form, independent of where they were loaded from.

Linear weights keep the torch convention (out_features, in_features): ``w_up`` is (neurons, d),
``w_down`` is (d, neurons). FFN weights may be absent (None) when a runtime streams them. A
resident matrix may also be a packed (e.g. quantized) matrix object with ``shape``, ``device``,
``nbytes``, ``to(device)``, ``linear(x)`` (x @ W.T) and ``rows(ids)`` (an embedding lookup).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
