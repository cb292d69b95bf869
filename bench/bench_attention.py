"""The decode attention block (kernels/attention.py) against the torch calls the forward's torch path
makes for the same block, one token, side by side in one run.

    python bench/bench_attention.py [--dtype f16|bf16|f32] [--cached 100] [--repeat 200] [--json F]

Per shape (d, heads, kv heads; head_dim = d / heads): q/k/v projections of the normed input, the key
and value written at slot ``cached``, softmax attention over slots [0, cached], the output projection
and the residual add. Torch side: ``model.transformer.linear`` for each projection (a half matrix is
applied to the input rounded to half, as the forward does) and scaled_dot_product_attention over the
cache. Neither side applies RoPE. Times are medians after a warm-up; GB/s counts the four matrices'
bytes once per call (the block's memory traffic floor).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from sparseflash.kernels import attention
from sparseflash.model.decode_native import host_view
from sparseflash.model.transformer import linear

SHAPES = ((256, 4, 4), (2048, 16, 16), (4096, 32, 8))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _median_s(fn, repeat: int) -> float:
    for _ in range(max(3, repeat // 10)):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(d: int, heads: int, kv_heads: int, dtype: torch.dtype, cached: int, repeat: int) -> dict:
    hd = d // heads
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(n, d, generator=g) / d**0.5).to(dtype) for n in (d, kv_heads * hd, kv_heads * hd)]
    wo = (torch.randn(d, d, generator=g) / d**0.5).to(dtype)
    x, h = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    kc, vc = torch.randn(kv_heads, cached + 1, hd, generator=g), torch.randn(kv_heads, cached + 1, hd, generator=g)

    def torch_block():
        q = linear(x, w[0]).view(1, heads, 1, hd)
        k, v = linear(x, w[1]).view(kv_heads, hd), linear(x, w[2]).view(kv_heads, hd)
        kc[:, cached], vc[:, cached] = k, v
        rep = heads // kv_heads
        kk, vv = kc.repeat_interleave(rep, 0)[None], vc.repeat_interleave(rep, 0)[None]
        ctx = F.scaled_dot_product_attention(q, kk, vv).reshape(1, d)
        return h + linear(ctx, wo)

    views = [host_view(t) for t in w] + [host_view(wo)]
    none = np.zeros(0, np.float32)
    proj = (views[0], none, views[1], none, views[2], none, views[3], none)
    xn, hn = x.numpy()[0].copy(), h.numpy()[0].copy()
    kn, vn = kc.numpy().copy(), vc.numpy().copy()
    scratch = attention.Scratch(d, d, kv_heads * hd, cached + 1)
    no_rope = np.zeros(0, np.float32)

    def native_block():
        attention.attend(xn, hn, proj, kn, vn, cached, 0, heads, hd, no_rope, no_rope, hd**-0.5, scratch)

    native_s, torch_s = _median_s(native_block, repeat), _median_s(torch_block, repeat)
    nbytes = sum(t.numel() * t.element_size() for t in (*w, wo))
    return {"d": d, "heads": heads, "kv_heads": kv_heads, "native_us": native_s * 1e6, "torch_us": torch_s * 1e6,
            "native_gbps": nbytes / native_s / 1e9, "torch_gbps": nbytes / torch_s / 1e9, "speedup": torch_s / native_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    ap.add_argument("--cached", type=int, default=100, help="positions already in the KV cache")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    attention.warmup()
    rows = [measure(d, h, kv, DTYPES[a.dtype], a.cached, a.repeat) for d, h, kv in SHAPES]
    print(f"{a.dtype} matrices, {a.cached} cached positions, torch {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'d, heads, kv':<16}{'native us':>11}{'GB/s':>7}{'torch us':>11}{'GB/s':>7}{'native vs torch':>17}")
    for r in rows:
        print(f"{r['d']}, {r['heads']}, {r['kv_heads']:<8}{r['native_us']:>11.1f}{r['native_gbps']:>7.1f}"
              f"{r['torch_us']:>11.1f}{r['torch_gbps']:>7.1f}{r['speedup']:>16.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dtype": a.dtype, "cached": a.cached, "rows": rows, "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
