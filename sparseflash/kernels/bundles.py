"""Pack FFN weights into neuron bundles and back.

Neuron i's bundle is row i of the bundle matrix (neurons, bundle_len):
    non-gated: [up_i (d) | down_i (d)]               bundle_len = 2d
    gated:     [gate_i (d) | up_i (d) | down_i (d)]  bundle_len = 3d
up_i / gate_i are row i of W_up / W_gate (n, d); down_i is column i of W_down (d, n).
One bundle is everything the FFN needs from neuron i, so an active neuron costs one read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sparseflash.kernels.errors import KernelInputError
from sparseflash.kernels.storage import from_f32, storage_name, to_f32


class FFNWeights(NamedTuple):
    """Full FFN weights as float32: w_up (n, d), w_down (d, n), w_gate (n, d) or None."""

    w_up: np.ndarray
    w_down: np.ndarray
    w_gate: np.ndarray | None


class NeuronWeights(NamedTuple):
    """One neuron's vectors as float32, each (d,): up_i, down_i, gate_i (None if not gated)."""

    up: np.ndarray
    down: np.ndarray
    gate: np.ndarray | None


def bundle_len(d: int, gated: bool) -> int:
    """Elements in one bundle for hidden size d (multiply by the storage itemsize for bytes)."""
    return (3 if gated else 2) * d


def _as_f32(name: str, weight: Any) -> np.ndarray:
    if hasattr(weight, "detach"):  # a torch tensor; bf16 cannot go to numpy directly
        weight = weight.detach().float().cpu().numpy()
    weight = np.asarray(weight)
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise KernelInputError(f"{name} must be a 2-D float array, got {weight.dtype} {weight.shape}")
    return weight.astype(np.float32, copy=False)


def pack_bundles(w_up: Any, w_down: Any, w_gate: Any = None, dtype: str | np.dtype = "f16") -> np.ndarray:
    """Bundle matrix (n, bundle_len) from W_up (n, d), W_down (d, n) and optional W_gate (n, d).

    Accepts numpy arrays or torch tensors. dtype is the storage: "f32", "f16" or "bf16"
    (or np.float32 / np.float16); bf16 comes back as uint16 bits (pass storage="bf16" to kernels).
    """
    storage = storage_name(dtype)
    up = _as_f32("w_up", w_up)
    down = _as_f32("w_down", w_down)
    n, d = up.shape
    if down.shape != (d, n):
        raise KernelInputError(f"w_down must be (d, n) = {(d, n)} to match w_up {up.shape}, got {down.shape}")
    parts = [up, down.T]  # down.T row i is column i of W_down
    if w_gate is not None:
        gate = _as_f32("w_gate", w_gate)
        if gate.shape != (n, d):
            raise KernelInputError(f"w_gate must be (n, d) = {(n, d)} like w_up, got {gate.shape}")
        parts.insert(0, gate)
    return from_f32(np.concatenate(parts, axis=1), storage)  # (n, bundle_len)


def _split(rows: np.ndarray, gated: bool, storage: str | None) -> tuple[np.ndarray, ...]:
    storage = storage_name(storage if storage is not None else rows.dtype)
    parts = 3 if gated else 2
    if rows.shape[-1] % parts:
        raise KernelInputError(f"bundle_len {rows.shape[-1]} is not a multiple of {parts} (gated={gated})")
    return tuple(np.split(to_f32(rows, storage), parts, axis=-1))


def unpack_bundle(bundle: np.ndarray, *, gated: bool, storage: str | None = None) -> NeuronWeights:
    """Split one bundle row (bundle_len,) into float32 up_i, down_i, gate_i vectors of length d."""
    bundle = np.asarray(bundle)
    if bundle.ndim != 1:
        raise KernelInputError(f"bundle must be one row (bundle_len,), got shape {bundle.shape}")
    parts = _split(bundle, gated, storage)
    return NeuronWeights(up=parts[-2], down=parts[-1], gate=parts[0] if gated else None)


def unpack_bundles(bundles: np.ndarray, *, gated: bool, storage: str | None = None) -> FFNWeights:
    """Inverse of pack_bundles: float32 W_up (n, d), W_down (d, n), W_gate (n, d) or None."""
    bundles = np.asarray(bundles)
    if bundles.ndim != 2:
        raise KernelInputError(f"bundles must be (n, bundle_len), got shape {bundles.shape}")
    parts = _split(bundles, gated, storage)
    return FFNWeights(
        w_up=np.ascontiguousarray(parts[-2]),
        w_down=np.ascontiguousarray(parts[-1].T),
        w_gate=np.ascontiguousarray(parts[0]) if gated else None,
    )
