"""The CUDA back end agrees with the numpy reference.

Runs on Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1) or, with
SPARSEFLASH_REAL_CUDA=1, on a real GPU; skipped when neither is there. The simulator runs
every GPU thread as a Python thread, so shapes stay tiny (d = 32..64, n = 64..128).
"""

import numpy as np
import pytest

from sparseflash.kernels import cuda as cuda_backend
from sparseflash.kernels import get_backend
from sparseflash.kernels.synthetic import random_active_set, random_layer

pytestmark = pytest.mark.skipif(not cuda_backend.is_available(), reason="no GPU and no CUDA simulator")


def rel_err(y, y_ref):
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def compare(layer, batch, share, seed=0):
    """Run cuda and reference on the same call; return (rel error of y, max activation error)."""
    x = np.random.default_rng(seed).standard_normal((batch, layer.d), dtype=np.float32)
    slots = random_active_set(layer.n, share, seed=seed)
    results = []
    for name in ("cuda", "reference"):
        acts = np.full((batch, slots.size), np.nan, dtype=np.float32)
        y = get_backend(name).sparse_ffn(x, layer.bundles, slots, layer.kind, storage=layer.storage,
                                         gate_bias=layer.gate_bias, up_bias=layer.up_bias,
                                         activations_out=acts)
        results.append((y, acts))
    (y, acts), (y_ref, acts_ref) = results
    return rel_err(y, y_ref), float(np.max(np.abs(acts - acts_ref), initial=0.0))


# One case per kind; storages, batch sizes and biases rotate through them.
CASES = [
    ("relu2", "f32", 1, False),
    ("relu", "f16", 2, True),
    ("silu", "bf16", 1, False),
    ("gelu", "f32", 3, True),
    ("gelu_tanh", "f16", 1, False),
    ("reglu", "bf16", 2, True),
    ("relu2glu", "f32", 1, True),
    ("swiglu", "f16", 1, True),
    ("geglu", "bf16", 1, False),
    ("geglu_tanh", "f32", 2, False),
]


@pytest.mark.parametrize(("kind", "storage", "batch", "biases"), CASES)
def test_cuda_matches_reference(kind, storage, batch, biases):
    layer = random_layer(32, 64, kind, storage, biases=biases, seed=batch)

    y_err, acts_err = compare(layer, batch, share=0.5)

    assert y_err <= 1e-5
    assert acts_err <= 1e-4


def test_cuda_full_active_set_and_more_tokens_than_one_launch():
    layer = random_layer(32, 20, "swiglu", "f16", biases=True)  # 20 neurons: the last block is part-full

    y_err, acts_err = compare(layer, batch=cuda_backend.TOKENS + 2, share=1.0)

    assert y_err <= 1e-5 and acts_err <= 1e-4


def test_cuda_empty_active_set_gives_zeros():
    layer = random_layer(32, 64, "relu2", "f16")

    y = get_backend("cuda").sparse_ffn(np.ones(32, np.float32), layer.bundles, [], "relu2")

    assert y.shape == (32,) and not y.any()


def test_cuda_keeps_bundles_and_output_on_the_device():
    from numba import cuda

    layer = random_layer(64, 128, "reglu", "bf16", biases=True)
    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    slots = random_active_set(128, 0.125)
    out = cuda.device_array((1, 64), dtype=np.float32)

    y = get_backend("cuda").sparse_ffn(x, cuda.to_device(layer.bundles), slots, "reglu", storage="bf16",
                                       gate_bias=layer.gate_bias, up_bias=layer.up_bias, out=out)

    y_ref = get_backend("reference").sparse_ffn(x, layer.bundles, slots, "reglu", storage="bf16",
                                                gate_bias=layer.gate_bias, up_bias=layer.up_bias)
    assert y is out
    assert rel_err(out.copy_to_host(), y_ref) <= 1e-5


def test_cuda_calls_reuse_device_scratch_and_stay_exact(monkeypatch):
    """After a first call of a size, calls of that size or smaller allocate no device memory (each
    allocation is a cudaMalloc; numba's deferred frees of them wait for the whole GPU), and reusing
    the scratch buffers changes no result: a smaller call after a larger one, empty sets between."""
    from numba import cuda

    layer = random_layer(64, 128, "reglu", "f16", biases=True)
    bundles = cuda.to_device(layer.bundles)
    out = cuda.device_array((2, 64), dtype=np.float32)
    backend, reference = get_backend("cuda"), get_backend("reference")
    x = np.random.default_rng(1).standard_normal((2, 64), dtype=np.float32)

    def both(share, seed):
        slots = random_active_set(128, share, seed=seed)
        acts = np.full((2, slots.size), np.nan, dtype=np.float32)
        backend.sparse_ffn(x, bundles, slots, "reglu", storage="f16", gate_bias=layer.gate_bias,
                           up_bias=layer.up_bias, out=out, activations_out=acts)
        ref_acts = np.empty_like(acts)
        y_ref = reference.sparse_ffn(x, layer.bundles, slots, "reglu", storage="f16", gate_bias=layer.gate_bias,
                                     up_bias=layer.up_bias, activations_out=ref_acts)
        assert np.abs(out.copy_to_host() - y_ref).max() <= 1e-5 * max(1.0, np.abs(y_ref).max())
        assert np.abs(acts - ref_acts).max(initial=0.0) <= 1e-5

    both(0.5, 0)  # sizes the scratch buffers
    allocations = []
    for name in ("device_array", "to_device", "pinned_array"):
        real = getattr(cuda, name)
        monkeypatch.setattr(cuda, name, lambda *a, _real=real, _name=name, **k: allocations.append(_name) or _real(*a, **k))
    for share, seed in ((0.25, 1), (0.0, 2), (0.5, 3), (0.125, 4)):
        both(share, seed)
    assert allocations == []


# Quantized bundles: gated and not, both storages, with and without biases.
QUANT_CASES = [
    ("relu2", "q8", 1, False),
    ("reglu", "q8", 2, True),
    ("swiglu", "q4", 1, True),
    ("gelu", "q4", 2, False),
]


@pytest.mark.parametrize(("kind", "storage", "batch", "biases"), QUANT_CASES)
def test_cuda_quantized_matches_dequantize_first_reference(kind, storage, batch, biases):
    layer = random_layer(64, 40, kind, storage, biases=biases, seed=batch)

    y_err, acts_err = compare(layer, batch, share=0.5)

    assert y_err <= 1e-5
    assert acts_err <= 1e-4


def test_cuda_keeps_quantized_bundles_and_output_on_the_device():
    from numba import cuda

    layer = random_layer(32, 24, "relu2glu", "q4", biases=True)
    x = np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32)
    slots = random_active_set(24, 0.5)
    out = cuda.device_array((1, 32), dtype=np.float32)

    y = get_backend("cuda").sparse_ffn(x, cuda.to_device(layer.bundles), slots, "relu2glu", storage="q4",
                                       gate_bias=layer.gate_bias, up_bias=layer.up_bias, out=out)

    y_ref = get_backend("reference").sparse_ffn(x, layer.bundles, slots, "relu2glu", storage="q4",
                                                gate_bias=layer.gate_bias, up_bias=layer.up_bias)
    assert y is out
    assert rel_err(out.copy_to_host(), y_ref) <= 1e-5


@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_cuda_quant_linear_matches_dequantize_then_matmul(storage):
    from numba import cuda

    from sparseflash.kernels import quantize

    rng = np.random.default_rng(1)
    w = quantize(rng.standard_normal((5, 64), dtype=np.float32), storage)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    out = cuda.device_array((2, 5), dtype=np.float32)

    y_host = get_backend("cuda").quant_linear(x, w, storage)
    y_dev = get_backend("cuda").quant_linear(x, cuda.to_device(w), storage, out=out)

    y_ref = get_backend("reference").quant_linear(x, w, storage)
    assert y_host.shape == (2, 5) and rel_err(y_host, y_ref) <= 1e-5
    assert y_dev is out and rel_err(out.copy_to_host(), y_ref) <= 1e-5
