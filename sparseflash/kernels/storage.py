"""Bundle storage dtypes: float32, float16, and bfloat16 kept as raw uint16 bits.

numpy has no bfloat16, so bf16 bundles are uint16 arrays holding the upper 16 bits of the
float32 value; decoding is `uint32(bits) << 16` viewed as float32. Because a uint16 array is
ambiguous, bf16 must always be named explicitly with storage="bf16".
"""

from __future__ import annotations

import numpy as np

from sparseflash.kernels.errors import KernelInputError

STORAGES = ("f32", "f16", "bf16")
_ALIASES = {
    "f32": "f32", "float32": "f32",
    "f16": "f16", "float16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
}
# numpy dtype in which each storage is kept in memory and on disk.
STORAGE_DTYPE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


def storage_name(storage: str | np.dtype | type) -> str:
    """Canonical storage name ("f32", "f16", "bf16") for a name alias or numpy float dtype."""
    if isinstance(storage, str):
        if storage.lower() in _ALIASES:
            return _ALIASES[storage.lower()]
        raise KernelInputError(f"storage must be one of {STORAGES}, got {storage!r}")
    dtype = np.dtype(storage)
    if dtype == np.float32:
        return "f32"
    if dtype == np.float16:
        return "f16"
    raise KernelInputError(f"storage dtype must be float32 or float16 (bf16: pass storage='bf16'), got {dtype}")


def resolve_storage(bundles: np.ndarray, storage: str | None) -> str:
    """Storage of a bundle matrix: checked against `storage` if given, else detected from dtype."""
    dtype = np.dtype(bundles.dtype)
    if storage is None:
        if dtype == np.uint16:
            raise KernelInputError("bundles are uint16: pass storage='bf16' to read them as bfloat16 bits")
        return storage_name(dtype)
    name = storage_name(storage)
    if dtype != STORAGE_DTYPE[name]:
        raise KernelInputError(f"storage={name!r} needs bundles of dtype {STORAGE_DTYPE[name]}, got {dtype}")
    return name


def bf16_bits_from_f32(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest even, like torch) and return the uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    # NaN must stay NaN (rounding could carry it into infinity); keep sign, force a quiet NaN.
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7FC0)
    return rounded


def f32_from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_f32(values: np.ndarray, storage: str) -> np.ndarray:
    """Decode stored values (any shape) to float32 exactly; f32 input is returned as is."""
    if storage == "bf16":
        return f32_from_bf16_bits(values)
    return np.asarray(values, dtype=np.float32)


def from_f32(values: np.ndarray, storage: str) -> np.ndarray:
    """Encode float32 values in `storage` (f16: IEEE round to nearest, bf16: round to nearest even)."""
    values = np.asarray(values, dtype=np.float32)
    if storage == "bf16":
        return bf16_bits_from_f32(values)
    return values.astype(STORAGE_DTYPE[storage_name(storage)])
