"""Bundle storage dtypes: float32, float16, bfloat16 kept as raw uint16 bits, and quantized q8 / q4.

numpy has no bfloat16, so bf16 bundles are uint16 arrays holding the upper 16 bits of the
float32 value; decoding is `uint32(bits) << 16` viewed as float32. Because a uint16 array is
ambiguous, bf16 must always be named explicitly with storage="bf16". Quantized bundles
("q8", "q4", see quant.py) are raw uint8 bytes, so they too must be named explicitly.
The element-wise codecs here (to_f32 / from_f32) are for the float storages only.
"""

from __future__ import annotations

import numpy as np

from sparseflash.kernels.errors import KernelInputError
from sparseflash.kernels.quant import QUANT_STORAGES

FLOAT_STORAGES = ("f32", "f16", "bf16")
STORAGES = FLOAT_STORAGES + QUANT_STORAGES
_ALIASES = {
    "f32": "f32", "float32": "f32",
    "f16": "f16", "float16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
    "q8": "q8", "q8_0": "q8",
    "q4": "q4", "q4_0": "q4",
}
# numpy dtype in which each storage is kept in memory and on disk.
STORAGE_DTYPE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
                 "q8": np.dtype(np.uint8), "q4": np.dtype(np.uint8)}


def storage_name(storage: str | np.dtype | type) -> str:
    """Canonical storage name ("f32", "f16", "bf16", "q8", "q4") for a name alias or numpy float dtype."""
    if isinstance(storage, str):
        if storage.lower() in _ALIASES:
            return _ALIASES[storage.lower()]
        raise KernelInputError(f"storage must be one of {STORAGES}, got {storage!r}")
    dtype = np.dtype(storage)
    if dtype == np.float32:
        return "f32"
    if dtype == np.float16:
        return "f16"
    raise KernelInputError(f"storage dtype must be float32 or float16 (bf16, q8, q4: pass storage= by name), "
                           f"got {dtype}")


def resolve_storage(bundles: np.ndarray, storage: str | None) -> str:
    """Storage of a bundle matrix: checked against `storage` if given, else detected from dtype."""
    dtype = np.dtype(bundles.dtype)
    if storage is None:
        if dtype == np.uint16:
            raise KernelInputError("bundles are uint16: pass storage='bf16' to read them as bfloat16 bits")
        if dtype == np.uint8:
            raise KernelInputError("bundles are uint8: pass storage='q8' or storage='q4' to read them as quantized")
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


def _float_only(storage: str) -> None:
    if storage in QUANT_STORAGES:
        raise KernelInputError(f"{storage} is quantized by groups, not element by element: use quant.quantize / "
                               "quant.dequantize (or bundles.pack_bundles / decode_bundles)")


def to_f32(values: np.ndarray, storage: str) -> np.ndarray:
    """Decode stored float values (any shape) to float32 exactly; f32 input is returned as is."""
    _float_only(storage)
    if storage == "bf16":
        return f32_from_bf16_bits(values)
    return np.asarray(values, dtype=np.float32)


def from_f32(values: np.ndarray, storage: str) -> np.ndarray:
    """Encode float32 values in a float storage (f16: IEEE round to nearest, bf16: round to nearest even)."""
    _float_only(storage_name(storage))
    values = np.asarray(values, dtype=np.float32)
    if storage == "bf16":
        return bf16_bits_from_f32(values)
    return values.astype(STORAGE_DTYPE[storage_name(storage)])
