"""Pack FFN weights into neuron bundles and back.

Neuron i's bundle is row i of the bundle matrix (neurons, bundle_len):
    non-gated: [up_i (d) | down_i (d)]               bundle_len = 2d
    gated:     [gate_i (d) | up_i (d) | down_i (d)]  bundle_len = 3d
up_i / gate_i are row i of W_up / W_gate (n, d); down_i is column i of W_down (d, n).
One bundle is everything the FFN needs from neuron i, so an active neuron costs one read.

Quantized storages ("q8", "q4") keep the same order of parts, each part quantized along d
on its own (quant.py: its d/32 float16 scales, then its values), so the matrix is
(neurons, bundle_nbytes) uint8 with bundle_nbytes = parts * quant.part_nbytes(d).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sparseflash.kernels import quant
from sparseflash.kernels.errors import KernelInputError
from sparseflash.kernels.quant import QUANT_STORAGES
from sparseflash.kernels.storage import STORAGE_DTYPE, from_f32, storage_name, to_f32

PART_NAMES = {2: ("up", "down"), 3: ("gate", "up", "down")}  # parts of a bundle, in order


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
    """Values (weights) in one bundle for hidden size d: 3d gated, else 2d. For bytes see bundle_nbytes."""
    return (3 if gated else 2) * d


def part_nbytes(d: int, storage: str) -> int:
    """Bytes of one d-long part ([gate,] up or down) in a storage: d * itemsize, or quant.part_nbytes."""
    storage = storage_name(storage)
    if storage in QUANT_STORAGES:
        return quant.part_nbytes(d, storage)
    return d * STORAGE_DTYPE[storage].itemsize


def bundle_nbytes(d: int, gated: bool, storage: str) -> int:
    """Bytes of one neuron bundle (one row of the bundle matrix) for hidden size d, in any storage.

    f32: 4 parts*d, f16/bf16: 2 parts*d, q8: 34 parts*d/32, q4: 18 parts*d/32 (parts = 3 gated, else 2;
    quantized storages need d to be a multiple of 32). Always even.
    """
    return (3 if gated else 2) * part_nbytes(d, storage)


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
    "q8" / "q4" quantize each part along d (d a multiple of 32; non-finite weights are refused)
    and return (n, bundle_nbytes) uint8 (pass storage="q8" / "q4" to kernels).
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
    if storage in QUANT_STORAGES:
        return np.concatenate([quant.quantize(p, storage) for p in parts], axis=1)  # (n, bundle_nbytes)
    return from_f32(np.concatenate(parts, axis=1), storage)  # (n, bundle_len)


def decode_bundles(rows: np.ndarray, *, parts: int, storage: str, row_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 (..., parts * d) values of bundle rows (..., bundle_len) in any storage, exact.

    Quantized rows are dequantized part by part; a non-finite scale raises KernelInputError
    naming the row (row_ids[row] if given, e.g. the slots the rows came from) and the part.
    """
    rows = np.asarray(rows)
    storage = storage_name(storage)
    if rows.shape[-1] % parts:
        raise KernelInputError(f"bundle_len {rows.shape[-1]} is not a multiple of {parts} (parts per bundle)")
    if storage not in QUANT_STORAGES:
        return to_f32(rows, storage)
    if rows.dtype != np.uint8:
        raise KernelInputError(f"{storage} bundles must be uint8, got {rows.dtype}")
    flat = rows.reshape(-1, rows.shape[-1])
    split = np.split(flat, parts, axis=1)
    for name, part in zip(PART_NAMES[parts], split):
        quant.check_scales(part, storage, what=f"{name} part of bundle row", row_ids=row_ids)
    values = [quant.dequantize(part, storage, check=False) for part in split]
    return np.concatenate(values, axis=1).reshape(*rows.shape[:-1], -1)


def check_quantized(rows: np.ndarray, d: int, gated: bool, storage: str) -> None:
    """Validate quantized bundle rows from disk: (n, bundle_nbytes(d, gated, storage)) uint8, finite scales.

    Raises KernelInputError with one line naming the storage and shape, or the first bundle
    row, part (gate / up / down) and group whose float16 scale is inf or NaN. The kernels do not
    re-check scales on every call; readers call this once on data they load.
    """
    storage = storage_name(storage)
    if storage not in QUANT_STORAGES:
        raise KernelInputError(f"check_quantized needs a quantized storage {QUANT_STORAGES}, got {storage!r}")
    expected = bundle_nbytes(d, gated, storage)
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != expected:
        raise KernelInputError(f"{storage} bundles for d={d}, gated={gated} must be uint8 (n, {expected}), "
                               f"got {rows.dtype} {rows.shape}")
    parts = 3 if gated else 2
    for name, part in zip(PART_NAMES[parts], np.split(rows, parts, axis=1)):
        quant.check_scales(part, storage, what=f"{name} part of bundle row")


def _split(rows: np.ndarray, gated: bool, storage: str | None) -> tuple[np.ndarray, ...]:
    storage = storage_name(storage if storage is not None else rows.dtype)
    parts = 3 if gated else 2
    return tuple(np.split(decode_bundles(rows, parts=parts, storage=storage), parts, axis=-1))


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
