"""Dense torch FFN: the baseline the sparse kernels are measured against.

dense_ffn() runs the whole layer from full weights (W_up / W_gate (n, d), W_down (d, n)),
the way a dense model would. sparse_ffn() here is the "dense" back end: the same signature
as the sparse back ends, computed as a full matmul over every slot of the bundle matrix with
the inactive neurons masked out. It converts (or dequantizes) the whole matrix to float32 on
every call, so it is a second oracle for tests, not a fast path; so is its quant_linear. torch
is imported on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparseflash.kernels.bundles import decode_bundles
from sparseflash.kernels.contract import check_call, check_linear, finish, finish_linear
from sparseflash.kernels.kinds import FFNKind, ffn_kind
from sparseflash.kernels.quant import QUANT_STORAGES, dequantize


def activate(z: Any, activation: str) -> Any:
    """torch activation by name (kinds.ACTIVATIONS)."""
    import torch.nn.functional as F

    if activation == "relu2":
        return F.relu(z).square()
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def dense_ffn(
    x: Any,
    w_up: Any,
    w_down: Any,
    kind: str | FFNKind,
    *,
    w_gate: Any = None,
    gate_bias: Any = None,
    up_bias: Any = None,
) -> Any:
    """y = act(...) @ W_down.T for torch tensors x (batch, d), W_up/W_gate (n, d), W_down (d, n).

    All tensors must share one dtype (float32, float16 or bfloat16); the result has it too.
    No down-projection bias, like the sparse kernels.
    """
    import torch

    kind = ffn_kind(kind)
    if kind.gated != (w_gate is not None):
        raise ValueError(f"kind {kind.name} {'needs' if kind.gated else 'takes no'} w_gate")
    with torch.inference_mode():
        up = x @ w_up.T  # (batch, n)
        if up_bias is not None:
            up = up + up_bias
        if kind.gated:
            gate = x @ w_gate.T
            if gate_bias is not None:
                gate = gate + gate_bias
            a = activate(gate, kind.activation) * up
        else:
            a = activate(up, kind.activation)
        return a @ w_down.T  # (batch, d)


def _f32_tensor(rows: np.ndarray, storage: str, parts: int) -> Any:
    import torch

    if storage == "bf16":  # torch reads the raw bits as bfloat16 directly
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
    if storage in QUANT_STORAGES:
        return torch.from_numpy(decode_bundles(rows, parts=parts, storage=storage))
    return torch.from_numpy(rows).float()


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
    """Dense back end: full torch matmul over all slots, inactive neurons masked to 0."""
    import torch

    call = check_call(x, bundles, active_slots, kind, storage=storage, gate_bias=gate_bias,
                      up_bias=up_bias, out=out, activations_out=activations_out)
    d = call.d
    weights = _f32_tensor(np.asarray(call.bundles), call.storage, call.kind.parts)  # (slots, parts * d)
    x_t = torch.from_numpy(call.x)
    with torch.inference_mode():
        up = x_t @ weights[:, -2 * d : -d].T  # (batch, slots)
        if call.up_bias is not None:
            up = up + torch.from_numpy(call.up_bias)
        if call.kind.gated:
            gate = x_t @ weights[:, :d].T
            if call.gate_bias is not None:
                gate = gate + torch.from_numpy(call.gate_bias)
            a = activate(gate, call.kind.activation) * up
        else:
            a = activate(up, call.kind.activation)
        slots = torch.from_numpy(call.slots)
        mask = torch.zeros(weights.shape[0], dtype=torch.float32)
        mask.index_add_(0, slots, torch.ones(slots.numel()))  # a slot listed twice counts twice
        y = (a * mask) @ weights[:, -d:]  # (batch, d)
        if call.activations_out is not None:
            call.activations_out[...] = a[:, slots].numpy()
    result = call.out if call.out is not None else np.empty((call.batch, d), dtype=np.float32)
    result[...] = y.numpy()
    return finish(call, result)


def quant_linear(x: Any, w: Any, storage: str, *, out: Any = None) -> np.ndarray:
    """x @ W.T with W dequantized whole to float32 and a torch matmul; float32 (batch, rows)."""
    import torch

    call = check_linear(x, w, storage, out)
    weights = torch.from_numpy(dequantize(np.asarray(call.w), call.storage))  # (rows, k) float32
    with torch.inference_mode():
        y = (torch.from_numpy(call.x) @ weights.T).numpy()
    result = call.out if call.out is not None else np.empty_like(y)
    result[...] = y
    return finish_linear(call, result)


def warmup() -> None:
    """Nothing to compile."""
