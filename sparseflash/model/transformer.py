"""Dense reference forward pass in torch with a preallocated KV cache.

The FFN is a pluggable callable ``ffn(layer, x_normed) -> output`` so that profiling can watch
activations, quality checks can mask them, and the streaming runtime can compute only the neurons
it has read. Everything else (embeddings, attention, norms, head) is computed here. An FFN object
may also have ``begin_step(tokens)`` and ``end_step()``: they are called when a forward step starts
and ends (the streaming runtime times each token's layers with them), and ``note_attention(seconds)``:
it is told each layer's attention time (wall time on the host) before that layer's FFN call.

A compression plugin (model/plugin.py) may shorten a prompt during prefill: after its layer, each
group of ``ratio`` prompt tokens becomes one vector, so later layers hold fewer KV slots than
positions (``KVCache.shift``, ``KVCache.key_pos``; docs/plugins.md states the rules).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparseflash.errors import SparseflashError
from sparseflash.model.config import ModelConfig, rope_inv_freq
from sparseflash.model.decode_native import NativeDecode
from sparseflash.model.ffn import DenseFFN
from sparseflash.model.weights import LayerWeights, ModelWeights

if TYPE_CHECKING:
    from sparseflash.model.plugin import CompressionPlugin

FFNFn = Callable[[int, torch.Tensor], torch.Tensor]
_CAUSAL = object()  # attention(): the plain causal mask of slots = positions


class KVCache:
    """Keys and values of every layer, preallocated and filled in place.

    Uncompressed, every layer has one slot per position (slot = position) and ``max_len`` slots.
    After a compressed prefill the layers after the plugin hold one slot per group of prompt tokens
    plus the uncompressed tail and the decoded tokens: there slot = position - ``shift[layer]``, the
    layer holds ``capacity[layer]`` slots, and ``key_pos[layer][slot]`` is the last position a slot
    covers (a query at position q sees the slot iff key_pos <= q).
    """

    def __init__(self, config: ModelConfig, max_len: int, batch: int = 1, dtype=torch.float32,
                 device: torch.device | str = "cpu", capacity: list[int] | None = None):
        layers = config.num_layers
        if capacity is None:
            shape = (layers, batch, config.num_kv_heads, max_len, config.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
            self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))  # views
            capacity = [max_len] * layers
        else:  # per-layer lengths (a compressed prompt): one tensor per layer, no 5-d view
            if len(capacity) != layers or max(capacity) > max_len:
                raise ValueError(f"capacity {capacity} does not fit {layers} layers of at most {max_len} slots")
            per = lambda n: torch.zeros((batch, config.num_kv_heads, n, config.head_dim), dtype=dtype, device=device)  # noqa: E731
            self.layer_k, self.layer_v = [per(n) for n in capacity], [per(n) for n in capacity]
            self.k = self.v = None
        self.capacity = list(capacity)
        self.max_len = max_len  # positions (the uncompressed layers' slots)
        self.length = 0  # positions filled
        self.shift = [0] * layers  # slot = position - shift
        self.key_pos: list[torch.Tensor | None] = [None] * layers  # set on compressed layers only

    @property
    def device(self) -> torch.device:
        return self.layer_k[0].device

    @property
    def compressed(self) -> bool:
        return any(p is not None for p in self.key_pos)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.layer_k, *self.layer_v))

    @property
    def used_nbytes(self) -> int:
        """Bytes of the slots filled so far (keys and values, every layer)."""
        k = self.layer_k[0]
        per_slot = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
        return sum(max(0, self.length - s) for s in self.shift) * per_slot


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
        self.native_decode = True  # one-token host steps through native kernels (model/decode_native.py)
        self._native = NativeDecode(config, self._norm_shift)

    def new_cache(self, max_len: int, batch: int = 1, capacity: list[int] | None = None) -> KVCache:
        """A KV cache on this model's device for ``max_len`` positions (``capacity``: slots per layer)."""
        return KVCache(self.config, max_len, batch, device=self.device, capacity=capacity)

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

    def _position_mask(self, q_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor | None:
        """(queries, keys) True = attend: a key is visible iff the last position it covers is <= the
        query's (and, with a sliding window, inside the window); None when one query sees every key."""
        mask = key_pos[None, :] <= q_pos[:, None]
        if self.config.sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - self.config.sliding_window
        if len(q_pos) == 1 and bool(mask.all()):
            return None
        return mask

    def attention(self, layer: int, x: torch.Tensor, cos, sin, cache: KVCache | None, start: int,
                  mask=_CAUSAL, w: LayerWeights | None = None) -> torch.Tensor:
        """Attention of ``x`` (batch, tokens, d) whose keys go to slots [start, start+tokens); ``mask``
        (queries, keys) replaces the causal mask of slots = positions; ``w`` (default: the model's own
        layer) lets a layer-by-layer caller hand in weights it has just read."""
        c = self.config
        w = self.weights.layers[layer] if w is None else w
        b, t, _ = x.shape
        q = linear(x, w.wq, w.bq).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = linear(x, w.wk, w.bk).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = linear(x, w.wv, w.bv).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache.layer_k[layer], cache.layer_v[layer]
            ck[:b, :, start : start + t] = k
            cv[:b, :, start : start + t] = v
            k = ck[:b, :, : start + t]
            v = cv[:b, :, : start + t]
        groups = c.num_heads // c.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is _CAUSAL:
            mask = self._mask(start, t, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)  # (batch, tokens, heads*head_dim)
        return linear(out, w.wo, w.bo)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0, last_only: bool = False,
        plugin: CompressionPlugin | None = None,
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for ``tokens`` (batch, tokens) at positions start.. .

        With a cache, keys/values are written at [start, start+tokens) and attention covers
        [0, start+tokens); without one, the tokens attend only to each other (start must be 0).
        With ``plugin`` (a prefill at start 0) the prompt is compressed after the plugin's layer and
        the logits are those of the compressed sequence: one row per group, then the tail's rows.
        """
        return self.differentiable_forward(tokens, cache, start, last_only, plugin)

    __call__ = forward

    def differentiable_forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0, last_only: bool = False,
        plugin: CompressionPlugin | None = None, groups: int | None = None, keep_last: int | None = None,
    ) -> torch.Tensor:
        """``forward`` outside inference mode, so that autograd can pass through the frozen weights
        (plugin training). ``groups`` overrides the plugin's group count for the tokens (training
        compresses a prompt that a continuation follows in the same call); ``keep_last`` returns the
        logits of the last rows only."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        b, t = tokens.shape
        end = start + t
        if cache is not None and end > cache.max_len:
            raise SparseflashError(f"sequence of {end} tokens exceeds the KV cache of {cache.max_len} positions")
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a KV cache")
        if cache is not None and cache.device != self.device:
            raise SparseflashError(f"KV cache on {cache.device}, model on {self.device}: make it with new_cache()")
        begin, end_step = getattr(self.ffn, "begin_step", None), getattr(self.ffn, "end_step", None)
        if begin is not None:
            begin(b * t)
        tokens, w = tokens.to(self.device), self.weights
        h = (F.embedding(tokens, w.embed) if isinstance(w.embed, torch.Tensor) else w.embed.rows(tokens)).float()
        if plugin is not None:
            if start != 0:
                raise SparseflashError("a compression plugin applies to a prefill at position 0")
            h = self._compressed(h, plugin, plugin.groups(t) if groups is None else groups, cache)
        elif cache is not None and cache.compressed:
            positions = torch.arange(start, end, device=self.device)
            cos, sin = self._rope(positions)
            h = self._layers(h, range(len(self.weights.layers)), cos, sin, cache,
                             lambda i: self._slot_and_mask(i, cache, positions))
        else:
            cos, sin = self._rope(torch.arange(start, end, device=self.device))
            native = self._native_views(cache) if b * t == 1 else None
            if native is None and self._native_ok(cache):  # a prompt step: decoding follows
                self._native.warm()
            if native is not None:
                h = self._native_layers(h, native, cos, sin, cache, start)
            else:
                h = self._layers(h, range(len(self.weights.layers)), cos, sin, cache, lambda i: (start, _CAUSAL))
        if cache is not None:
            cache.length = end
        if last_only or keep_last is not None:
            h = h[:, -1:] if last_only else h[:, h.shape[1] - keep_last :]
        logits = self._native_head(h) if b * t == 1 and self._native_ok(cache) else None
        if logits is None:
            logits = linear(self.norm(h, w.final_norm_w, w.final_norm_b), w.lm_head).cpu()
        if end_step is not None:
            end_step()
        return logits

    def _layers(self, h: torch.Tensor, layers: range, cos, sin, cache: KVCache | None, slot_and_mask) -> torch.Tensor:
        """Run ``layers`` on h (batch, tokens, d); ``slot_and_mask(i)`` gives layer i's first KV slot and mask."""
        b, t, _ = h.shape
        note = getattr(self.ffn, "note_attention", None)  # a streamed FFN accounts attention time apart
        for i in layers:
            layer = self.weights.layers[i]
            slot, mask = slot_and_mask(i)
            normed = self.norm(h, layer.attn_norm_w, layer.attn_norm_b)
            t0 = time.perf_counter()
            attn = self.attention(i, normed, cos, sin, cache, slot, mask)
            if note is not None:
                note(time.perf_counter() - t0)
            h = h + attn
            x = self.norm(h, layer.ffn_norm_w, layer.ffn_norm_b)
            h = h + self.ffn(i, x.reshape(b * t, -1)).reshape(b, t, -1)
        return h

    def _native_ok(self, cache: KVCache | None) -> bool:
        return (self.native_decode and cache is not None and self.device.type == "cpu" and not cache.compressed
                and not torch.is_grad_enabled())

    def _native_views(self, cache: KVCache | None) -> list[tuple] | None:
        """Per layer (weight views, KV views) for a one-token step on the native path, or None if it does
        not apply (model/decode_native.py says when it does)."""
        if not self._native_ok(cache):
            return None
        out = []
        for i, layer in enumerate(self.weights.layers):
            views, kv = self._native.layer(i, layer), self._native.kv(cache, i)
            if views is None or kv is None:
                return None
            out.append((views, kv))
        return out

    def _native_layers(self, h: torch.Tensor, native: list[tuple], cos, sin, cache: KVCache, pos: int) -> torch.Tensor:
        """The layers of one token (h (1, 1, d)) on the native path: the attention norm, the attention in
        one call (what ``note_attention`` is told), the FFN norm, and the FFN (``self.ffn``, as on the
        torch path) on its output."""
        note = getattr(self.ffn, "note_attention", None)
        hn = h.reshape(-1).numpy().copy()
        cos_n, sin_n = cos[0].contiguous().numpy(), sin[0].contiguous().numpy()
        for i, (views, kv) in enumerate(native):
            xn = self._native.norm(hn, views[0])
            t0 = time.perf_counter()
            self._native.attend(xn, hn, views[1], kv, pos, cos_n, sin_n, cache.capacity[i])
            if note is not None:
                note(time.perf_counter() - t0)
            x = torch.from_numpy(self._native.norm(hn, views[2]))[None]
            hn += self.ffn(i, x).reshape(-1).numpy()
        return torch.from_numpy(hn).view(1, 1, -1)

    def _native_head(self, h: torch.Tensor) -> torch.Tensor | None:
        w = self.weights
        logits = self._native.head(h.reshape(-1).contiguous().numpy(), w.final_norm_w, w.final_norm_b, w.lm_head)
        return None if logits is None else torch.from_numpy(logits).view(1, 1, -1)

    def _slot_and_mask(self, i: int, cache: KVCache, positions: torch.Tensor):
        """Decoding over a compressed cache: layer i's first slot for ``positions``, and its mask."""
        key_pos = cache.key_pos[i]
        start = int(positions[0])
        if key_pos is None:
            return start, _CAUSAL
        slot = start - cache.shift[i]
        if slot + len(positions) > cache.capacity[i]:
            raise SparseflashError(f"layer {i}: {slot + len(positions)} slots exceed the compressed KV cache "
                                   f"of {cache.capacity[i]}")
        key_pos[slot : slot + len(positions)] = positions
        return slot, self._position_mask(positions, key_pos[: slot + len(positions)])

    def _compressed(self, h: torch.Tensor, plugin: CompressionPlugin, groups: int, cache: KVCache | None):
        """Layers up to the plugin's on every position, then the plugin packs ``groups`` groups of
        ``ratio`` tokens into one vector each, and the later layers run on the shorter sequence."""
        b, t, d = h.shape
        k, after = plugin.ratio, plugin.layer + 1
        packed = groups * k
        if not 0 <= packed <= t or after >= len(self.weights.layers):
            raise SparseflashError(f"cannot compress {groups} groups of {k} tokens of a {t}-token prompt after "
                                   f"layer {plugin.layer} of {len(self.weights.layers)}")
        cos, sin = self._rope(torch.arange(t, device=self.device))
        h = self._layers(h, range(after), cos, sin, cache, lambda i: (0, _CAUSAL))
        short = torch.cat((plugin(h[:, :packed].reshape(b, groups, k, d)), h[:, packed:]), dim=1)  # (b, groups+tail, d)
        rope_pos, key_pos = (p.to(self.device) for p in plugin.positions(groups, t))
        if cache is not None:
            for i in range(after, len(self.weights.layers)):
                if short.shape[1] > cache.capacity[i]:
                    raise SparseflashError(f"layer {i}: {short.shape[1]} compressed slots exceed the KV cache "
                                           f"of {cache.capacity[i]}")
                cache.shift[i] = packed - groups
                cache.key_pos[i] = torch.zeros(cache.capacity[i], dtype=torch.long, device=self.device)
                cache.key_pos[i][: short.shape[1]] = key_pos
        cos, sin = self._rope(rope_pos)
        mask = self._position_mask(key_pos, key_pos)
        return self._layers(short, range(after, len(self.weights.layers)), cos, sin, cache, lambda i: (0, mask))
