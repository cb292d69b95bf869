"""GGML block formats for tests: valid random blocks and an independent element-by-element decoder.

The decoder follows the block layouts of ggml-common.h and the reference loops of ggml-quants.c
(``dequantize_row_*``), written out here one element at a time so that it shares nothing with
gguf-py's vectorised ``gguf.quants`` that sparseflash uses. Offsets are in bytes within a block.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
# type -> (values per block, bytes per block, offsets of its float16 scale fields)
LAYOUT = {
    "Q4_0": (32, 18, (0,)), "Q4_1": (32, 20, (0, 2)), "Q5_0": (32, 22, (0,)), "Q5_1": (32, 24, (0, 2)),
    "Q8_0": (32, 34, (0,)), "Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,)),
    "Q4_K": (256, 144, (0, 2)), "Q5_K": (256, 176, (0, 2)), "Q6_K": (256, 210, (208,)),
}


def random_blocks(kind: str, n_blocks: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """(n_blocks, bytes) uint8: random quant and sub-scale bits, finite random float16 scales."""
    _, size, scales = LAYOUT[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in scales:
        d = (rng.uniform(0.2, 1.0, n_blocks) * scale * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _f16(b: np.ndarray, at: int) -> float:
    return float(b[at : at + 2].copy().view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """The j-th 6-bit (scale, min) pair of a Q4_K/Q5_K block's 12 scale bytes."""
    q = [int(v) for v in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _legacy(kind: str, b: np.ndarray) -> list[float]:
    d = _f16(b, 0)
    if kind == "Q8_0":
        return [d * int(v) for v in b[2:34].view(np.int8)]
    m = _f16(b, 2) if kind in ("Q4_1", "Q5_1") else 0.0
    qh = int.from_bytes(bytes(b[4:8] if kind == "Q5_1" else b[2:6]), "little") if kind[:2] == "Q5" else 0
    qs = b[{"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[kind] :]
    out = [0.0] * 32
    for j in range(16):
        lo, hi = int(qs[j]) & 0xF, int(qs[j]) >> 4
        if kind[:2] == "Q5":
            lo |= ((qh >> j) & 1) << 4
            hi |= ((qh >> (j + 16)) & 1) << 4
        if kind in ("Q4_0", "Q5_0"):
            off = 8 if kind == "Q4_0" else 16
            out[j], out[j + 16] = d * (lo - off), d * (hi - off)
        else:
            out[j], out[j + 16] = d * lo + m, d * hi + m
    return out


def _q2_k(b):
    scales, q, d, dmin = b[0:16], b[16:80], _f16(b, 80), _f16(b, 82)
    out, s = [], 0
    for n in range(2):
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                sc = int(scales[s])
                s += 1
                out += [d * (sc & 0xF) * ((int(q[32 * n + half + l]) >> shift) & 3) - dmin * (sc >> 4) for l in range(16)]
    return out


def _q3_k(b):
    hm, q, raw, d = b[0:32], b[32:96], b[96:108], _f16(b, 108)
    scales = []
    for j in range(16):  # 6-bit scales: low 4 bits from bytes 0-7, high 2 bits from bytes 8-11
        low = (int(raw[j % 8]) >> (4 * (j // 8))) & 0xF
        high = (int(raw[8 + j % 4]) >> (2 * (j // 4))) & 3
        scales.append((low | (high << 4)) - 32)
    out, s, m = [], 0, 1
    for n in range(2):
        for shift in (0, 2, 4, 6):
            for half in (0, 16):
                dl = d * scales[s]
                s += 1
                for l in range(16):
                    k = 32 * 0 + half + l
                    out.append(dl * (((int(q[32 * n + half + l]) >> shift) & 3) - (0 if int(hm[k]) & m else 4)))
            m <<= 1
    return out


def _q45_k(b, five: bool):
    d, dmin, scales = _f16(b, 0), _f16(b, 2), b[4:16]
    qh, ql = (b[16:48], b[48:176]) if five else (None, b[16:144])
    out = []
    for g in range(4):  # 64 values per group: two sub-blocks of 32, low then high nibbles
        for sub in range(2):
            sc, mn = _scale_min_k4(2 * g + sub, scales)
            for l in range(32):
                v = (int(ql[32 * g + l]) >> (4 * sub)) & 0xF
                if five and (int(qh[l]) >> (2 * g + sub)) & 1:
                    v += 16
                out.append(d * sc * v - dmin * mn)
    return out


def _q6_k(b):
    ql, qh, sc, d = b[0:128], b[128:192], b[192:208].view(np.int8), _f16(b, 208)
    out = [0.0] * 256
    for n in range(2):
        for l in range(32):
            L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
            q = [(int(L[l]) & 0xF) | (((int(H[l]) >> 0) & 3) << 4), (int(L[l + 32]) & 0xF) | (((int(H[l]) >> 2) & 3) << 4),
                 (int(L[l]) >> 4) | (((int(H[l]) >> 4) & 3) << 4), (int(L[l + 32]) >> 4) | (((int(H[l]) >> 6) & 3) << 4)]
            for k in range(4):
                out[128 * n + l + 32 * k] = d * int(S[l // 16 + 2 * k]) * (q[k] - 32)
    return out


def decode(kind: str, blocks: np.ndarray) -> np.ndarray:
    """Float values (n_blocks * block values,) of raw blocks, one element at a time (float64)."""
    fn = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda b: _q45_k(b, False), "Q5_K": lambda b: _q45_k(b, True),
          "Q6_K": _q6_k}.get(kind, lambda b: _legacy(kind, b))
    return np.array([v for b in blocks.reshape(-1, LAYOUT[kind][1]) for v in fn(b)], dtype=np.float64)
