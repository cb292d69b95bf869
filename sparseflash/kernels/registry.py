"""Pick a back end by name. Back-end modules (numba, numba.cuda, torch) load on first request."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparseflash.kernels.errors import BackendUnavailableError, KernelInputError

BACKENDS = ("reference", "cpu", "cuda", "dense")
_MODULES = {
    "reference": "sparseflash.kernels.reference",
    "cpu": "sparseflash.kernels.cpu",
    "cuda": "sparseflash.kernels.cuda",
    "dense": "sparseflash.kernels.dense",
}


@dataclass(frozen=True)
class Backend:
    """One back end: sparse_ffn and quant_linear with the common signatures, warmup() to compile ahead of timing."""

    name: str
    sparse_ffn: Callable[..., Any]
    warmup: Callable[..., None]
    quant_linear: Callable[..., Any]


def get_backend(name: str) -> Backend:
    """Back end "reference", "cpu", "cuda" or "dense".

    Raises KernelInputError for an unknown name and BackendUnavailableError for "cuda"
    when numba.cuda sees neither a GPU nor the simulator.
    """
    if name not in _MODULES:
        raise KernelInputError(f"unknown back end {name!r}; expected one of {BACKENDS}")
    module = importlib.import_module(_MODULES[name])
    if name == "cuda" and not module.is_available():
        raise BackendUnavailableError(module.UNAVAILABLE)
    return Backend(name=name, sparse_ffn=module.sparse_ffn, warmup=module.warmup, quant_linear=module.quant_linear)


def available_backends() -> list[str]:
    """Names of the back ends that can run here (probes numba.cuda, so not free)."""
    names = ["reference", "cpu", "dense"]
    if importlib.import_module(_MODULES["cuda"]).is_available():
        names.insert(2, "cuda")
    return names


def sparse_ffn(
    x: Any,
    bundles: Any,
    active_slots: Any,
    kind: Any,
    *,
    backend: str = "cpu",
    storage: str | None = None,
    gate_bias: Any = None,
    up_bias: Any = None,
    out: Any = None,
    activations_out: Any = None,
) -> Any:
    """y = sum over active slots i of a_i * down_i, for each token of x.

    x: (batch, d) or (d,) float32 activations entering the FFN.
    bundles: (slots, bundle_len) bundle matrix, float32 / float16 / bf16 bits as uint16
        (then storage="bf16") / q8 or q4 bytes as uint8 (then storage="q8" / "q4", d a
        multiple of 32, bundle_len = bundle_nbytes(d, gated, storage)); row s holds one
        neuron's [gate |] up | down, each d long.
    active_slots: (k,) integer slot indices (rows of bundles); may be empty (y = 0).
    kind: FFNKind or a name from kinds.KINDS ("relu2", "reglu", "swiglu", ...).
    gate_bias, up_bias: optional (slots,) float32, indexed by slot like the rows.
    out: optional float32 array shaped like the result, overwritten and returned.
    activations_out: optional (batch, k) float32 ((k,) for 1-D x) that receives a_i per
        token, in active_slots order, so the caller sees which neurons really fired.
    Returns float32 (batch, d), or (d,) for 1-D x. Accumulation is float32 (reference: float64).
    Raises KernelInputError (a ValueError) on bad shapes, dtypes, storage or slots.
    """
    return get_backend(backend).sparse_ffn(
        x, bundles, active_slots, kind, storage=storage, gate_bias=gate_bias,
        up_bias=up_bias, out=out, activations_out=activations_out,
    )


def quant_linear(x: Any, w: Any, storage: str, *, backend: str = "cpu", out: Any = None) -> Any:
    """y = x @ W.T for a quantized matrix W, without a dequantized copy of W (cpu, cuda).

    x: (batch, k) or (k,) float32, k a multiple of 32.
    w: (rows, part_nbytes(k, storage)) uint8: row r is row r of W (rows, k) quantized along k
        (quant.quantize(W, storage)); storage "q8" or "q4".
    out: optional float32 (batch, rows) ((rows,) for 1-D x), overwritten and returned.
    Returns float32 (batch, rows), or (rows,) for 1-D x; accumulation in float32 (reference:
    float64 on W dequantized, dense: torch matmul on W dequantized). Bad shapes, dtypes or
    storage raise KernelInputError; cpu and cuda do not read the scales to check them (call
    quant.check_quantized_matrix once on loaded data), reference and dense refuse inf/NaN ones.
    """
    return get_backend(backend).quant_linear(x, w, storage, out=out)
