"""Every sparse FFN back end agrees with the numpy reference (and with a dense torch FFN)."""

import numpy as np
import pytest
import torch

from sparseflash.kernels import KINDS, STORAGES, dense_ffn, get_backend
from sparseflash.kernels.synthetic import random_active_set, random_layer

D, N = 64, 96


def rel_err(y, y_ref):
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def run(backend, layer, x, slots, **kwargs):
    """Call a back end on a synthetic layer; returns (y, activations)."""
    acts = np.full((x.shape[0], slots.size), np.nan, dtype=np.float32)
    y = get_backend(backend).sparse_ffn(
        x, layer.bundles, slots, layer.kind, storage=layer.storage,
        gate_bias=layer.gate_bias, up_bias=layer.up_bias, activations_out=acts, **kwargs,
    )
    return y, acts


def tokens(batch, d=D, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, d), dtype=np.float32)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("backend", ["cpu", "dense"])
def test_backend_matches_reference_on_same_stored_weights(backend, kind, storage):
    layer = random_layer(D, N, kind, storage, biases=True, seed=len(kind))
    x, slots = tokens(3), random_active_set(N, 0.4, seed=2)

    y, acts = run(backend, layer, x, slots)
    y_ref, acts_ref = run("reference", layer, x, slots)

    assert y.shape == (3, D) and y.dtype == np.float32
    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_allclose(acts, acts_ref, rtol=1e-4, atol=1e-5)


def test_cpu_thread_count_splits_only_calls_large_enough_to_pay(monkeypatch):
    from sparseflash.kernels import cpu

    monkeypatch.setattr(cpu, "_threads", lambda: 2)
    work = cpu._MIN_WORK_PER_THREAD
    assert cpu.thread_count(256, 512) == 1  # the bundled model's decode step: one thread
    assert cpu.thread_count(2 * work // 512, 512) == 2  # two threads' worth of work
    assert cpu.thread_count(2 * work // 512 - 1, 512) == 1
    assert cpu.thread_count(8, work) == 1  # fewer rows than a chunk: never split
    assert cpu.thread_count(10_000, 1 << 20) == 2  # never more than the cores


@pytest.mark.parametrize("kind", ["relu2", "reglu", "swiglu", "geglu_tanh"])
@pytest.mark.parametrize("backend", ["cpu", "dense"])
def test_batch_of_one_without_biases(backend, kind):
    layer = random_layer(D, N, kind, "f16", biases=False, seed=3)
    x, slots = tokens(1), random_active_set(N, 0.1, seed=4)

    y, acts = run(backend, layer, x, slots)
    y_ref, acts_ref = run("reference", layer, x, slots)

    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_allclose(acts, acts_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "dense"])
def test_one_dimensional_x_gives_one_dimensional_y(backend):
    layer = random_layer(D, N, "reglu", "f16")
    x, slots = tokens(2), random_active_set(N, 0.5)
    acts = np.empty(slots.size, dtype=np.float32)

    y_row = get_backend(backend).sparse_ffn(x[1], layer.bundles, slots, "reglu", activations_out=acts)
    y_batch = get_backend(backend).sparse_ffn(x, layer.bundles, slots, "reglu")

    assert y_row.shape == (D,)
    np.testing.assert_allclose(y_row, y_batch[1], rtol=1e-5, atol=1e-6)
    assert np.isfinite(acts).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "dense"])
def test_empty_active_set_gives_zeros(backend):
    layer = random_layer(D, N, "swiglu", "bf16", biases=True)
    out = np.full((2, D), 7.0, dtype=np.float32)

    y, acts = run(backend, layer, tokens(2), np.array([], dtype=np.int64), out=out)

    assert y is out and not y.any()
    assert acts.shape == (2, 0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_full_active_set_equals_dense_torch_ffn(kind):
    layer = random_layer(D, N, kind, "f32", biases=True, seed=5)
    x = tokens(4)
    gate = None if layer.w_gate is None else torch.from_numpy(layer.w_gate)
    bias = {"up_bias": torch.from_numpy(layer.up_bias)}
    if layer.gate_bias is not None:
        bias["gate_bias"] = torch.from_numpy(layer.gate_bias)
    y_dense = dense_ffn(torch.from_numpy(x), torch.from_numpy(layer.w_up), torch.from_numpy(layer.w_down),
                        kind, w_gate=gate, **bias).numpy()

    y, _ = run("cpu", layer, x, np.arange(N))

    assert rel_err(y, y_dense) <= 1e-5


@pytest.mark.parametrize(("storage", "tolerance"), [("f16", 2e-3), ("bf16", 1e-2)])
@pytest.mark.parametrize("kind", ["relu2", "swiglu"])
def test_half_storage_stays_close_to_float32_weights(kind, storage, tolerance):
    exact = random_layer(D, N, kind, "f32", seed=6)
    rounded = random_layer(D, N, kind, storage, seed=6)  # same weights, rounded on packing
    x, slots = tokens(2), random_active_set(N, 0.3)

    y_exact, _ = run("reference", exact, x, slots)
    y_rounded, _ = run("cpu", rounded, x, slots)

    assert rel_err(y_rounded, y_exact) <= tolerance


def test_activations_out_shows_which_predicted_neurons_fired():
    layer = random_layer(D, N, "relu", "f32", biases=True)
    x, slots = tokens(1), random_active_set(N, 0.5)

    _, acts = run("cpu", layer, x, slots)

    pre_activation = x @ layer.w_up[slots].T + layer.up_bias[slots]  # (1, k)
    np.testing.assert_allclose(acts, np.maximum(pre_activation, 0), rtol=1e-5, atol=1e-6)
    assert 0 < np.count_nonzero(acts) < slots.size  # some predicted neurons did not fire


def test_out_buffer_is_overwritten_and_returned():
    layer = random_layer(D, N, "relu2", "f16")
    x, slots = tokens(2), random_active_set(N, 0.2)
    out = np.full((2, D), np.nan, dtype=np.float32)

    y = get_backend("cpu").sparse_ffn(x, layer.bundles, slots, "relu2", out=out)

    assert y is out
    np.testing.assert_allclose(out, get_backend("reference").sparse_ffn(x, layer.bundles, slots, "relu2"),
                               rtol=1e-5, atol=1e-6)


def test_cpu_reads_readonly_memory_mapped_bundles(tmp_path):
    layer = random_layer(D, N, "reglu", "f16")
    path = tmp_path / "bundles.bin"
    layer.bundles.tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=layer.bundles.shape)
    x, slots = tokens(1), random_active_set(N, 0.3)

    y = get_backend("cpu").sparse_ffn(x, mapped, slots, "reglu")

    assert rel_err(y, get_backend("reference").sparse_ffn(x, layer.bundles, slots, "reglu")) <= 1e-5


def test_cpu_compiles_once_per_storage_not_per_call():
    from sparseflash.kernels import cpu

    cpu.warmup()
    compiled = len(cpu._neuron_range.signatures)
    for kind in ("relu2", "swiglu"):
        for batch in (1, 5):
            layer = random_layer(D, N, kind, "bf16", biases=True)
            run("cpu", layer, tokens(batch), random_active_set(N, 0.25))

    assert len(cpu._neuron_range.signatures) == compiled


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_threads_split_the_active_set_without_changing_the_result(monkeypatch, threads):
    from sparseflash.kernels import cpu

    monkeypatch.setattr(cpu, "_threads", lambda: threads)
    monkeypatch.setattr(cpu, "_MIN_WORK_PER_THREAD", 1)  # split this small call as a large one would be
    layer = random_layer(D, 1024, "relu2glu", "f16", biases=True)
    x, slots = tokens(2), random_active_set(1024, 0.5)

    y, acts = run("cpu", layer, x, slots)
    y_again, _ = run("cpu", layer, x, slots)
    y_ref, acts_ref = run("reference", layer, x, slots)

    np.testing.assert_array_equal(y, y_again)  # chunk partials are summed in a fixed order
    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_allclose(acts, acts_ref, rtol=1e-4, atol=1e-5)
