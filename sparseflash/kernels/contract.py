"""Argument checks shared by every back end, so all of them fail the same way on bad input.

check_call() validates shapes, dtypes, storage and slot range up front and returns a
FFNCall with normalised views: x as (batch, d) float32, slots as int64, and out /
activations_out reshaped to 2-D. Numba device arrays (anything with copy_to_host) are
accepted for bundles, biases, x and out; their shape and dtype are checked, not copied.

Float bundles give d as bundle_len / parts. Quantized bundles (uint8, storage "q8" / "q4")
take d from x, and bundle_len must be exactly bundles.bundle_nbytes(d, gated, storage).
Their scales are not read here (see bundles.check_quantized).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sparseflash.kernels.bundles import bundle_nbytes
from sparseflash.kernels.errors import KernelInputError
from sparseflash.kernels.kinds import FFNKind, ffn_kind
from sparseflash.kernels.quant import QUANT_STORAGES, check_group_multiple, check_matrix_shape
from sparseflash.kernels.storage import resolve_storage


class FFNCall(NamedTuple):
    """A validated sparse_ffn call: x (batch, d) float32, slots (k,) int64, views as given."""

    x: Any
    bundles: Any
    slots: np.ndarray
    kind: FFNKind
    storage: str
    gate_bias: Any
    up_bias: Any
    out: Any
    activations_out: Any
    squeeze: bool  # x was (d,): return (d,) and accept activations_out of shape (k,)

    @property
    def batch(self) -> int:
        """Tokens in this call."""
        return self.x.shape[0]

    @property
    def d(self) -> int:
        """Hidden size (elements)."""
        return self.x.shape[1]


def is_device_array(a: Any) -> bool:
    """True for a Numba CUDA device array (real or simulator)."""
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host") and hasattr(a, "shape")


def _host(a: Any) -> Any:
    return a if is_device_array(a) else np.asarray(a)


def _check_f32(name: str, a: Any, shape: tuple[int, ...]) -> Any:
    a = _host(a)
    if np.dtype(a.dtype) != np.float32 or tuple(a.shape) != shape:
        raise KernelInputError(f"{name} must be float32 of shape {shape}, got {a.dtype} {tuple(a.shape)}")
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        raise KernelInputError(f"{name} must be C-contiguous")
    return a


def _reshape(a: Any, shape: tuple[int, ...]) -> Any:
    return a.reshape(shape) if tuple(a.shape) != shape else a


def _hidden_size(x: Any, blen: int, kind: FFNKind, storage: str) -> int:
    """d of a call: bundle_len / parts for float bundles; from x for quantized ones (checked against blen)."""
    if storage not in QUANT_STORAGES:
        if blen % kind.parts:
            raise KernelInputError(f"bundle_len {blen} is not a multiple of {kind.parts} for kind {kind.name}")
        return blen // kind.parts
    if len(x.shape) not in (1, 2):
        raise KernelInputError(f"x must be float32 (batch, d) or (d,), got {x.dtype} {tuple(x.shape)}")
    d = x.shape[-1]
    check_group_multiple(d)
    expected = bundle_nbytes(d, kind.gated, storage)
    if blen != expected:
        raise KernelInputError(f"{storage} bundles for d={d}, kind {kind.name} must be {expected} bytes long, "
                               f"got bundle_len {blen}")
    return d


def check_call(
    x: Any,
    bundles: Any,
    active_slots: Any,
    kind: str | FFNKind,
    *,
    storage: str | None = None,
    gate_bias: Any = None,
    up_bias: Any = None,
    out: Any = None,
    activations_out: Any = None,
) -> FFNCall:
    """Validate one sparse_ffn call; raise KernelInputError (a ValueError) naming the bad argument."""
    kind = ffn_kind(kind)
    bundles = _host(bundles)
    if len(bundles.shape) != 2:
        raise KernelInputError(f"bundles must be 2-D (slots, bundle_len), got shape {tuple(bundles.shape)}")
    if isinstance(bundles, np.ndarray) and not bundles.flags.c_contiguous:
        raise KernelInputError("bundles must be C-contiguous (each bundle one contiguous row)")
    storage = resolve_storage(bundles, storage)
    n_slots, blen = bundles.shape
    x = _host(x)
    d = _hidden_size(x, blen, kind, storage)
    squeeze = len(x.shape) == 1
    if np.dtype(x.dtype) != np.float32 or len(x.shape) not in (1, 2) or x.shape[-1] != d or 0 in x.shape:
        raise KernelInputError(f"x must be float32 (batch, {d}) or ({d},), got {x.dtype} {tuple(x.shape)}")
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
    x = _reshape(x, (1, d)) if squeeze else x

    slots = np.asarray(active_slots.copy_to_host() if is_device_array(active_slots) else active_slots)
    if slots.ndim != 1 or not (np.issubdtype(slots.dtype, np.integer) or slots.size == 0):
        raise KernelInputError(f"active_slots must be a 1-D integer array, got {slots.dtype} {slots.shape}")
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
        bad = slots[(slots < 0) | (slots >= n_slots)][0]
        raise KernelInputError(f"active_slots has slot {bad} outside [0, {n_slots})")

    if gate_bias is not None and not kind.gated:
        raise KernelInputError(f"gate_bias given but kind {kind.name} is not gated")
    gate_bias = None if gate_bias is None else _check_f32("gate_bias", gate_bias, (n_slots,))
    up_bias = None if up_bias is None else _check_f32("up_bias", up_bias, (n_slots,))

    batch, k = x.shape[0], slots.size
    if out is not None:
        out_shape = (d,) if squeeze else (batch, d)
        out = _reshape(_check_f32("out", out, out_shape), (batch, d))
    if activations_out is not None:
        acts_shape = (k,) if squeeze else (batch, k)
        activations_out = _reshape(_check_f32("activations_out", activations_out, acts_shape), (batch, k))
    return FFNCall(x, bundles, slots, kind, storage, gate_bias, up_bias, out, activations_out, squeeze)


def finish(call: FFNCall, y: Any) -> Any:
    """Shape the (batch, d) result like x: (d,) when x was 1-D."""
    return y.reshape(call.d) if call.squeeze else y


class LinearCall(NamedTuple):
    """A validated quant_linear call: x (batch, k) float32, w (rows, part_nbytes(k)) uint8."""

    x: Any
    w: Any
    storage: str
    out: Any  # (batch, rows) float32 view of the caller's out, or None
    squeeze: bool  # x was (k,): return (rows,)
    caller_out: Any  # the caller's out as given ((rows,) for 1-D x), returned as is


def check_linear(x: Any, w: Any, storage: str, out: Any = None) -> LinearCall:
    """Validate one quant_linear call; raise KernelInputError naming the bad argument. Scales are not read."""
    if storage not in QUANT_STORAGES:
        raise KernelInputError(f"quant_linear storage must be one of {QUANT_STORAGES}, got {storage!r}")
    x, w = _host(x), _host(w)
    if np.dtype(x.dtype) != np.float32 or len(x.shape) not in (1, 2) or 0 in x.shape:
        raise KernelInputError(f"x must be float32 (batch, k) or (k,), got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    check_group_multiple(k, "k (x's last axis)")
    check_matrix_shape(w, k, storage)
    if isinstance(w, np.ndarray) and not w.flags.c_contiguous:
        raise KernelInputError("w must be C-contiguous (each row one contiguous part)")
    squeeze = len(x.shape) == 1
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
    x = _reshape(x, (1, k)) if squeeze else x
    caller_out = out
    if out is not None:
        rows = w.shape[0]
        caller_out = _check_f32("out", out, (rows,) if squeeze else (x.shape[0], rows))
        out = _reshape(caller_out, (x.shape[0], rows))
    return LinearCall(x, w, storage, out, squeeze, caller_out)


def finish_linear(call: LinearCall, y: Any) -> Any:
    """The caller's out if given, else the (batch, rows) result shaped like x: (rows,) when x was 1-D."""
    if call.caller_out is not None:
        return call.caller_out
    return y.reshape(y.shape[1]) if call.squeeze else y
