"""The host decode path of model/transformer.py: one token's attention block, FFN norm and head through
native kernels (kernels/attention.py) instead of some twenty torch calls a layer.

It applies to a forward step of one token on the host, with a KV cache of slots = positions (no
compression plugin), outside autograd, when a layer's matrices are plain tensors (float32, float16 or
bfloat16; a packed quantized matrix goes the torch way) and, in float16, hold at most F16_MAX_BYTES. The results equal the torch path's up to
float rounding: float32 sums in another order, and a half matrix applied to the float32 input rather
than to its half rounding (tests/test_decode_native.py). ``Transformer.native_decode = False`` turns
it off.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.kernels import attention
from sparseflash.kernels.halfbits import kernel_view
from sparseflash.model.config import ModelConfig
from sparseflash.model.weights import LayerWeights

_NONE = np.zeros(0, dtype=np.float32)
_warm = False  # kernels/attention.py compiled (or loaded from numba's disk cache) in this process
_STORAGE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# a layer whose float16 q/k/v/o matrices hold more bytes goes the torch way: there torch's own float16
# product (several threads) beats the kernels (bench/bench_attention.py, 2026-12-04: d=1024, 8 MiB,
# native 1.4-1.6x faster; d=1536 0.6-0.8x; d=2048 0.5-0.9x; float32 and bfloat16 not slower at any size)
F16_MAX_BYTES = 8 << 20


def host_view(t: torch.Tensor | None) -> np.ndarray | None:
    """The kernels' zero-copy view of a host tensor (float32 as is, float16 / bfloat16 as their bits),
    or None where the kernels cannot take it (another dtype or device, not contiguous, a packed matrix)."""
    if t is None:
        return _NONE
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype not in _STORAGE or not t.is_contiguous():
        return None
    raw = t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy()  # numpy has no bfloat16
    return kernel_view(raw, _STORAGE[t.dtype])


class NativeDecode:
    """Per-layer kernel views of a model's resident weights (made on first use), KV-cache views and the
    work arrays, for one-token host steps."""

    def __init__(self, config: ModelConfig, shift: float):
        c = self.config = config
        self.layernorm, self.shift, self.eps = c.norm == "layernorm1p", np.float32(shift), np.float32(c.norm_eps)
        self._layers: dict[int, tuple] = {}  # layer -> (its LayerWeights, its wq, views or None)
        self._kv: tuple = (None, None)  # (KVCache, per layer (k, v) views)
        self._scratch: attention.Scratch | None = None
        self._head: tuple = (None, None)  # (head tensor, view)

    @staticmethod
    def warm() -> None:
        """Compile the kernels now (once per process; the forward calls it on a prompt step, so the
        first decoded token does not pay for it)."""
        global _warm
        if not _warm:
            attention.warmup()
            _warm = True

    def _norm_views(self, w, b) -> tuple | None:
        wv, bv = host_view(w), host_view(b)
        if wv is None or bv is None or wv.ndim != 1:
            return None
        return wv, bv, self.layernorm, self.shift, self.eps

    def layer(self, i: int, w: LayerWeights) -> tuple | None:
        """(attention norm, projections, FFN norm) views of layer i's weights ``w``, or None if a weight is
        not one the kernels take."""
        held = self._layers.get(i)
        if held is not None and held[0] is w and held[1] is w.wq:
            return held[2]
        proj = tuple(host_view(t) for t in (w.wq, w.bq, w.wk, w.bk, w.wv, w.bv, w.wo, w.bo))
        views = (self._norm_views(w.attn_norm_w, w.attn_norm_b), proj, self._norm_views(w.ffn_norm_w, w.ffn_norm_b))
        f16 = sum(m.nbytes for m in proj[::2] if m is not None and m.dtype == np.uint16)
        if any(v is None for v in (views[0], views[2], *proj)) or f16 > F16_MAX_BYTES:
            views = None
        self._layers[i] = (w, w.wq, views)
        return views

    def kv(self, cache, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Layer i's key and value views (kv_heads, slots, head_dim) of batch row 0, or None."""
        if self._kv[0] is not cache:
            views = [(host_view(k[0]), host_view(v[0])) for k, v in zip(cache.layer_k, cache.layer_v)]
            ok = all(a is not None and b is not None and a.dtype == np.float32 and b.dtype == np.float32
                     for a, b in views)
            self._kv = (cache, views if ok else None)
        views = self._kv[1]
        return None if views is None else views[i]

    def scratch(self, max_len: int) -> attention.Scratch:
        c = self.config
        if self._scratch is None or self._scratch.scores.size < max_len:
            self._scratch = attention.Scratch(c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                              max_len)
        return self._scratch

    def norm(self, h: np.ndarray, norm: tuple) -> np.ndarray:
        """A new (d,) array: the norm of h (d,) with a layer's norm views (its first or third entry)."""
        out = np.empty_like(h)
        attention.norm(h, *norm, out)
        return out

    def attend(self, xn: np.ndarray, h: np.ndarray, proj: tuple, kv: tuple, pos: int, cos: np.ndarray,
               sin: np.ndarray, max_len: int) -> None:
        """h (d,) += the attention of the token at position ``pos`` (xn: its normed input; the layer's
        projection views and KV views)."""
        c = self.config
        window = c.sliding_window
        lo = 0 if window is None else max(0, pos - window + 1)
        attention.attend(xn, h, proj, kv[0], kv[1], pos, lo, c.num_heads, c.head_dim, cos, sin, c.head_dim**-0.5,
                         self.scratch(max_len))

    def head(self, h: np.ndarray, norm_w, norm_b, lm_head) -> np.ndarray | None:
        """Logits (vocab,) of the last hidden state h (d,), or None if the head is not one the kernels take."""
        if self._head[0] is not lm_head:
            self._head = (lm_head, host_view(lm_head))
        norm, head = self._norm_views(norm_w, norm_b), self._head[1]
        if norm is None or head is None or head.ndim != 2:
            return None
        x = self.norm(h, norm)
        logits = np.empty(head.shape[0], dtype=np.float32)
        attention.matvec(head, x, logits)
        return logits
