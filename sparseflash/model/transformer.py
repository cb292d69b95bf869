"""Dense reference forward pass in torch with a preallocated KV cache.

The FFN is a pluggable callable ``ffn(layer, x_normed) -> output`` so that profiling can watch
activations, quality checks can mask them, and the streaming runtime can compute only the neurons
it has read. Everything else (embeddings, attention, norms, head) is computed here. An FFN object
may also have ``begin_step(tokens)`` and ``end_step()``: they are called when a forward step starts
and ends (the streaming runtime times each token's layers with them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparseflash.errors import SparseflashError
from sparseflash.model.config import ModelConfig, rope_inv_freq
from sparseflash.model.ffn import DenseFFN
from sparseflash.model.weights import ModelWeights

FFNFn = Callable[[int, torch.Tensor], torch.Tensor]


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions and filled in place."""

    def __init__(self, config: ModelConfig, max_len: int, batch: int = 1, dtype=torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b in float32 activations; half-precision weights (as a layout may hold them) are
    applied in their own dtype. ``w`` may also be a packed matrix with ``linear(x)`` (a layout's
    quantized resident weights, runtime/quant_weights.py)."""
    if not isinstance(w, torch.Tensor):
        out = w.linear(x)
        return out if b is None else out + b
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    out = F.linear(x.to(w.dtype), w).float()
    return out if b is None else out + b


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Transformer:
    """A decoder-only transformer over canonical weights; callable on token ids (batch, tokens).

    It computes on the device its weights are on (``weights.to("cuda")`` puts it on a GPU); token ids
    may come from the host, logits are returned on the host.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, ffn: FFNFn | None = None):
        self.config = config
        self.weights = weights
        self.device = weights.device
        self.ffn = ffn if ffn is not None else DenseFFN(weights.layers, config.activation, config.gated)
        inv_freq, self.rope_scale = rope_inv_freq(config)
        self.inv_freq = inv_freq.to(self.device)
        self._norm_shift = 1.0 if config.norm == "layernorm1p" else 0.0

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        """A KV cache on this model's device."""
        return KVCache(self.config, max_len, batch, device=self.device)

    def norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        if c.norm == "layernorm1p":
            return F.layer_norm(x, (c.hidden_size,), w + self._norm_shift, b, c.norm_eps)
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + c.norm_eps))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (tokens, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    def _mask(self, start: int, tokens: int, keys: int) -> torch.Tensor | None:
        window = self.config.sliding_window
        if tokens == 1 and (window is None or keys <= window):
            return None
        q_pos = torch.arange(start, start + tokens, device=self.device)[:, None]
        k_pos = torch.arange(keys, device=self.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask  # (tokens, keys), True = attend

    def attention(self, layer: int, x: torch.Tensor, cos, sin, cache: KVCache | None, start: int) -> torch.Tensor:
        c, w = self.config, self.weights.layers[layer]
        b, t, _ = x.shape
        q = linear(x, w.wq, w.bq).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = linear(x, w.wk, w.bk).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = linear(x, w.wv, w.bv).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer, :b, :, start : start + t] = k
            cache.v[layer, :b, :, start : start + t] = v
            k = cache.k[layer, :b, :, : start + t]
            v = cache.v[layer, :b, :, : start + t]
        groups = c.num_heads // c.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        mask = self._mask(start, t, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)  # (batch, tokens, heads*head_dim)
        return linear(out, w.wo, w.bo)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for ``tokens`` (batch, tokens) at positions start.. .

        With a cache, keys/values are written at [start, start+tokens) and attention covers
        [0, start+tokens); without one, the tokens attend only to each other (start must be 0).
        """
        if tokens.dim() == 1:
            tokens = tokens[None]
        b, t = tokens.shape
        w = self.weights
        end = start + t
        if cache is not None and end > cache.max_len:
            raise SparseflashError(f"sequence of {end} tokens exceeds the KV cache of {cache.max_len} positions")
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a KV cache")
        if cache is not None and cache.k.device != self.device:
            raise SparseflashError(f"KV cache on {cache.k.device}, model on {self.device}: make it with new_cache()")
        begin, end_step = getattr(self.ffn, "begin_step", None), getattr(self.ffn, "end_step", None)
        if begin is not None:
            begin(b * t)
        cos, sin = self._rope(torch.arange(start, end, device=self.device))
        tokens = tokens.to(self.device)
        h = (F.embedding(tokens, w.embed) if isinstance(w.embed, torch.Tensor) else w.embed.rows(tokens)).float()
        for i, layer in enumerate(w.layers):
            h = h + self.attention(i, self.norm(h, layer.attn_norm_w, layer.attn_norm_b), cos, sin, cache, start)
            x = self.norm(h, layer.ffn_norm_w, layer.ffn_norm_b)
            h = h + self.ffn(i, x.reshape(b * t, -1)).reshape(b, t, -1)
        if cache is not None:
            cache.length = end
        if last_only:
            h = h[:, -1:]
        logits = linear(self.norm(h, w.final_norm_w, w.final_norm_b), w.lm_head).cpu()
        if end_step is not None:
            end_step()
        return logits

    __call__ = forward
