"""Sparse FFN kernels: y = sum over active neurons of a_i * down_i, read from neuron bundles.

Arrays in, arrays out; this package imports only numpy, numba and torch, never the rest of
sparseflash. Importing it loads none of them beyond numpy: back ends load on get_backend().

    from sparseflash.kernels import get_backend, pack_bundles
    bundles = pack_bundles(w_up, w_down, dtype="f16")         # (n, 2d) float16
    cpu = get_backend("cpu"); cpu.warmup()                    # compile once, before timing
    y = cpu.sparse_ffn(x, bundles, active_slots, "relu2")    # (batch, d) float32

Quantized storage (q8 / q4, GGUF Q8_0 / Q4_0 arithmetic, groups of 32 along d; see quant.py):
    bundles = pack_bundles(w_up, w_down, dtype="q4")          # (n, bundle_nbytes(d, False, "q4")) uint8
    y = cpu.sparse_ffn(x, bundles, active_slots, "relu2", storage="q4")
    w = quantize(w_q, "q8")                                   # (rows, part_nbytes(k, "q8")) uint8
    y = cpu.quant_linear(x, w, "q8")                          # x @ w_q.T, (batch, rows) float32
"""

from sparseflash.kernels.bundles import (
    FFNWeights,
    NeuronWeights,
    bundle_len,
    bundle_nbytes,
    check_quantized,
    decode_bundles,
    pack_bundles,
    part_nbytes,
    unpack_bundle,
    unpack_bundles,
)
from sparseflash.kernels.dense import dense_ffn  # imports torch on first call only
from sparseflash.kernels.errors import BackendUnavailableError, KernelInputError
from sparseflash.kernels.kinds import ACTIVATIONS, KINDS, FFNKind, ffn_kind
from sparseflash.kernels.quant import (
    GROUP,
    QUANT_STORAGES,
    check_quantized_matrix,
    dequant_rows,
    dequantize,
    quantize,
)
from sparseflash.kernels.registry import (
    BACKENDS,
    Backend,
    available_backends,
    get_backend,
    quant_linear,
    sparse_ffn,
)
from sparseflash.kernels.storage import (
    FLOAT_STORAGES,
    STORAGES,
    bf16_bits_from_f32,
    f32_from_bf16_bits,
    from_f32,
    to_f32,
)

__all__ = [
    "ACTIVATIONS", "BACKENDS", "FLOAT_STORAGES", "GROUP", "KINDS", "QUANT_STORAGES", "STORAGES",
    "Backend", "BackendUnavailableError", "FFNKind", "FFNWeights", "KernelInputError", "NeuronWeights",
    "available_backends", "bf16_bits_from_f32", "bundle_len", "bundle_nbytes", "check_quantized",
    "check_quantized_matrix", "decode_bundles", "dense_ffn", "dequant_rows", "dequantize", "f32_from_bf16_bits",
    "ffn_kind", "from_f32", "get_backend", "pack_bundles", "part_nbytes", "quant_linear", "quantize",
    "sparse_ffn", "to_f32", "unpack_bundle", "unpack_bundles",
]
