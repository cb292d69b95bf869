"""Quantized storage "q8" and "q4": groups of 32 values, one float16 scale each (GGUF Q8_0 / Q4_0).

A *part* is d values quantized along their length (d a multiple of GROUP = 32), stored as
uint8 bytes, self-contained:

    [ d/32 scales, float16 little-endian | quantized values ]
    q8: values are d int8:       part_nbytes = d/32 * 2 + d      (34 bytes per 32 values)
    q4: values are d/2 bytes:    part_nbytes = d/32 * 2 + d / 2  (18 bytes per 32 values)

Value j of group g (j in 0..31) decodes to scale_g * q_j, with
    q8: q_j = the int8 at value byte g*32 + j
    q4: q_j = nibble - 8, where value byte g*16 + (j mod 16) holds value j in its low nibble
        for j < 16 and in its high nibble for j >= 16 (GGUF's Q4_0 order: byte i of a group
        is values i and i + 16, so a group's 16 bytes are the same as a GGUF Q4_0 block's).

Quantizing follows gguf-py's numpy reference bit for bit (float32 arithmetic):
    q8: scale = max|v| / 127; q = round-half-away-from-zero(v * (1/scale))
    q4: m = the value of largest magnitude (first one on ties), scale = m / -8;
        nibble = min(15, trunc(v * (1/scale) + 8.5))
    (1/scale taken as 0 for an all-zero group); the stored scale is float16(scale).
Non-finite input and scales that overflow float16 are refused. A matrix (rows, d) quantizes
to (rows, part_nbytes) uint8, each row one part: resident weights use this as is, and FFN
bundles concatenate one part per projection (see bundles.py).
"""

from __future__ import annotations

import numpy as np

from sparseflash.kernels.errors import KernelInputError

GROUP = 32  # values per float16 scale
QUANT_STORAGES = ("q8", "q4")
SCALE_BYTES = 2
_GROUP_VALUE_BYTES = {"q8": GROUP, "q4": GROUP // 2}  # bytes of quantized values per group


def _check_storage(storage: str) -> None:
    if storage not in QUANT_STORAGES:
        raise KernelInputError(f"quantized storage must be one of {QUANT_STORAGES}, got {storage!r}")


def check_group_multiple(d: int, what: str = "d") -> None:
    """Raise KernelInputError unless d (values along the quantized axis) is a positive multiple of 32."""
    if d <= 0 or d % GROUP:
        raise KernelInputError(f"{what} = {d} must be a positive multiple of {GROUP} for quantized storage")


def part_nbytes(d: int, storage: str) -> int:
    """Bytes of one quantized part of d values (d a multiple of 32): 34 d/32 (q8) or 18 d/32 (q4)."""
    _check_storage(storage)
    check_group_multiple(d)
    return d // GROUP * (SCALE_BYTES + _GROUP_VALUE_BYTES[storage])


def part_values(nbytes: int, storage: str) -> int:
    """d of a part of `nbytes` bytes (the inverse of part_nbytes); KernelInputError if none fits."""
    _check_storage(storage)
    group_bytes = SCALE_BYTES + _GROUP_VALUE_BYTES[storage]
    if nbytes <= 0 or nbytes % group_bytes:
        raise KernelInputError(f"{nbytes} bytes is not a whole number of {storage} groups ({group_bytes} bytes each)")
    return nbytes // group_bytes * GROUP


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # exact in float32: a - floor(a) has no rounding error, so ties go away from zero
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v)


def quantize(values: np.ndarray, storage: str) -> np.ndarray:
    """Quantize float values (..., d) along the last axis to parts (..., part_nbytes(d)) uint8.

    Raises KernelInputError for non-finite values, d not a multiple of 32, or a group whose
    scale does not fit float16 (|v| > 65504 * 127 for q8, * 8 for q4).
    """
    _check_storage(storage)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0:
        raise KernelInputError("values to quantize must have at least one axis")
    d = values.shape[-1]
    check_group_multiple(d)
    if not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[0]
        raise KernelInputError(f"cannot quantize non-finite value {values[tuple(bad)]} at index {tuple(bad.tolist())}")
    lead = values.shape[:-1]
    blocks = values.reshape(-1, GROUP)  # (groups, 32)
    if storage == "q8":
        scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    else:
        biggest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
        scale = biggest / np.float32(-8)
    with np.errstate(divide="ignore"):
        inverse = np.where(scale == 0, np.float32(0), np.float32(1) / scale).astype(np.float32)
    with np.errstate(over="ignore"):
        scale16 = scale.astype(np.float16)
    if not np.isfinite(scale16).all():
        group = int(np.argwhere(~np.isfinite(scale16))[0, 0])
        raise KernelInputError(f"cannot quantize to {storage}: the scale of group {group} ({float(scale[group, 0])}) "
                               "overflows float16")
    if storage == "q8":
        q = _round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)  # (groups, 32)
    else:
        nibbles = np.trunc(blocks * inverse + np.float32(8.5)).astype(np.uint8).clip(0, 15)  # (groups, 32)
        q = nibbles[:, :16] | (nibbles[:, 16:] << np.uint8(4))  # (groups, 16): value j low, j + 16 high
    groups = d // GROUP
    scale_bytes = scale16.reshape(-1, groups).view(np.uint8)  # (rows, 2 * groups), little-endian
    q = q.reshape(-1, groups * q.shape[1])
    return np.concatenate([scale_bytes, q], axis=1).reshape(*lead, -1)


def scales_of(parts: np.ndarray, storage: str) -> np.ndarray:
    """float16 scales (..., d/32) of quantized parts (..., part_nbytes)."""
    d = part_values(parts.shape[-1], storage)
    return np.ascontiguousarray(parts[..., : d // GROUP * SCALE_BYTES]).view("<f2")


def check_scales(parts: np.ndarray, storage: str, what: str = "row", row_ids: np.ndarray | None = None) -> None:
    """Raise KernelInputError naming the first row (and group) of `parts` (rows, nbytes) with a non-finite scale.

    The message says "{what} {row}: ..."; row_ids maps row positions to the numbers to print.
    """
    bits = scales_of(parts, storage).view(np.uint16)
    bits = bits.reshape(-1, bits.shape[-1])  # (rows, groups)
    bad = (bits & 0x7C00) == 0x7C00  # float16 exponent all ones: inf or NaN
    if bad.any():
        row, group = np.argwhere(bad)[0]
        value = float(bits[row, group:group + 1].view(np.float16)[0])
        label = row if row_ids is None else row_ids[row]
        raise KernelInputError(f"{what} {label}: scale of group {group} is {value} (corrupt quantized data)")


def dequantize(parts: np.ndarray, storage: str, *, check: bool = True) -> np.ndarray:
    """Decode quantized parts (..., part_nbytes) uint8 to float32 (..., d) exactly (scale * q in float32).

    check=True (default) first raises KernelInputError for a non-finite scale.
    """
    parts = np.asarray(parts)
    if parts.dtype != np.uint8 or parts.ndim == 0:
        raise KernelInputError(f"quantized {storage} data must be a uint8 array, got {parts.dtype} {parts.shape}")
    d = part_values(parts.shape[-1], storage)
    lead, groups = parts.shape[:-1], d // GROUP
    flat = parts.reshape(-1, parts.shape[-1])
    if check:
        check_scales(flat, storage)
    scale = scales_of(flat, storage).astype(np.float32)[:, :, None]  # (rows, groups, 1)
    q = flat[:, groups * SCALE_BYTES :].reshape(flat.shape[0], groups, -1)
    if storage == "q8":
        values = q.view(np.int8).astype(np.float32)  # (rows, groups, 32)
    else:
        values = np.concatenate([q & np.uint8(0x0F), q >> np.uint8(4)], axis=2).astype(np.float32) - np.float32(8)
    return (scale * values).reshape(*lead, d)


def check_quantized_matrix(w: np.ndarray, cols: int, storage: str) -> None:
    """Validate a resident quantized matrix: (rows, part_nbytes(cols)) uint8 with finite scales.

    Raises KernelInputError (one line, naming the row and group) otherwise. Readers call this
    once on data from disk; the fast kernels do not re-check scales per call.
    """
    check_matrix_shape(w, cols, storage)
    check_scales(np.asarray(w), storage, what="row")


def check_matrix_shape(w, cols: int, storage: str) -> None:
    """Shape and dtype of a quantized matrix of `cols` columns (numpy or device array); scales not read."""
    expected = part_nbytes(cols, storage)
    if np.dtype(w.dtype) != np.uint8 or len(w.shape) != 2 or w.shape[1] != expected:
        raise KernelInputError(f"a {storage} matrix of {cols} columns must be uint8 (rows, {expected}), "
                               f"got {w.dtype} {tuple(w.shape)}")


def dequant_rows(w: np.ndarray, rows, storage: str) -> np.ndarray:
    """float32 (len(rows), cols) of the given rows of a quantized matrix (e.g. embedding lookups).

    Only the requested rows are decoded (their scales are checked); rows may repeat.
    """
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise KernelInputError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    w = np.asarray(w)
    if w.dtype != np.uint8 or w.ndim != 2:
        raise KernelInputError(f"a {storage} matrix must be 2-D uint8, got {w.dtype} {w.shape}")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= w.shape[0]):
        bad = rows[(rows < 0) | (rows >= w.shape[0])][0]
        raise KernelInputError(f"row {bad} outside [0, {w.shape[0]})")
    picked = w[rows]
    check_scales(picked, storage, row_ids=rows)
    return dequantize(picked, storage, check=False)
