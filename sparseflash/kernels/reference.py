"""Reference back end: plain numpy, float64 accumulation. The oracle every fast path is tested against.

Quantized weights (q8 / q4) are dequantized first (exactly, to float32), then used like float ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparseflash.kernels.bundles import decode_bundles
from sparseflash.kernels.contract import check_call, check_linear, finish, finish_linear
from sparseflash.kernels.kinds import FFNKind
from sparseflash.kernels.quant import check_scales, dequantize

_CHUNK = 512  # neurons decoded at a time: bounds the float64 copy to ~CHUNK * bundle_len * 8 bytes
_erf = np.frompyfunc(math.erf, 1, 1)


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """Apply an activation elementwise in float64; NaN propagates through relu and relu2."""
    z = np.asarray(z, dtype=np.float64)
    if activation == "relu":
        return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0))
    if activation == "relu2":
        return np.square(activate(z, "relu"))
    if activation == "silu":
        with np.errstate(over="ignore"):
            return z / (1.0 + np.exp(-z))
    if activation == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    raise ValueError(f"unknown activation {activation!r}")


def neuron_activations(x: np.ndarray, rows: np.ndarray, kind: FFNKind, gate_b: Any, up_b: Any) -> np.ndarray:
    """a (batch, k) float64 for float64 bundle rows (k, bundle_len) and x (batch, d)."""
    d = x.shape[1]
    up = x @ rows[:, -2 * d : -d].T  # (batch, k)
    if up_b is not None:
        up = up + up_b
    if not kind.gated:
        return activate(up, kind.activation)
    gate = x @ rows[:, :d].T
    if gate_b is not None:
        gate = gate + gate_b
    return activate(gate, kind.activation) * up


def sparse_ffn(
    x: Any,
    bundles: Any,
    active_slots: Any,
    kind: Any,
    *,
    storage: str | None = None,
    gate_bias: Any = None,
    up_bias: Any = None,
    out: Any = None,
    activations_out: Any = None,
) -> np.ndarray:
    """y (batch, d) float32 = sum over active slots of a_i * down_i, computed in float64.

    Same arguments and result as every back end (see sparseflash.kernels.sparse_ffn).
    """
    call = check_call(x, bundles, active_slots, kind, storage=storage, gate_bias=gate_bias,
                      up_bias=up_bias, out=out, activations_out=activations_out)
    d = call.d
    x64 = call.x.astype(np.float64)
    y = np.zeros((call.batch, d), dtype=np.float64)
    for lo in range(0, call.slots.size, _CHUNK):
        chunk = call.slots[lo : lo + _CHUNK]
        rows = decode_bundles(call.bundles[chunk], parts=call.kind.parts, storage=call.storage,
                              row_ids=chunk)  # (chunk, parts * d) float32
        rows = rows.astype(np.float64)
        gate_b = None if call.gate_bias is None else call.gate_bias[chunk].astype(np.float64)
        up_b = None if call.up_bias is None else call.up_bias[chunk].astype(np.float64)
        a = neuron_activations(x64, rows, call.kind, gate_b, up_b)  # (batch, chunk)
        if call.activations_out is not None:
            call.activations_out[:, lo : lo + chunk.size] = a
        # A neuron with a == 0 contributes nothing, even if its down_i holds inf or NaN.
        with np.errstate(invalid="ignore"):
            contrib = a[:, :, None] * rows[None, :, -d:]  # (batch, chunk, d)
        y += np.where(a[:, :, None] != 0, contrib, 0.0).sum(axis=1)
    result = call.out if call.out is not None else np.empty((call.batch, d), dtype=np.float32)
    result[...] = y
    return finish(call, result)


def quant_linear(x: Any, w: Any, storage: str, *, out: Any = None) -> np.ndarray:
    """x @ W.T in float64 from W dequantized (a chunk of rows at a time); result float32 (batch, rows).

    Raises KernelInputError on bad shapes or storage, and on a non-finite scale in w.
    """
    call = check_linear(x, w, storage, out)
    x64 = call.x.astype(np.float64)
    rows = call.w.shape[0]
    y = call.out if call.out is not None else np.empty((call.x.shape[0], rows), dtype=np.float32)
    check_scales(call.w, call.storage)
    for lo in range(0, rows, _CHUNK):
        w64 = dequantize(call.w[lo : lo + _CHUNK], call.storage, check=False).astype(np.float64)  # (chunk, k)
        y[:, lo : lo + _CHUNK] = x64 @ w64.T
    return finish_linear(call, y)


def warmup() -> None:
    """Nothing to compile."""
