"""Quantized storage (q8 / q4): GGUF-exact arithmetic, golden bytes, kernels vs the dequantize-first reference."""

import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from sparseflash.kernels import (
    KernelInputError,
    bundle_nbytes,
    check_quantized,
    check_quantized_matrix,
    dequant_rows,
    dequantize,
    get_backend,
    pack_bundles,
    part_nbytes,
    quantize,
    unpack_bundle,
    unpack_bundles,
)
from sparseflash.kernels.synthetic import random_active_set, random_layer

GGUF_TYPE = {"q8": GGMLQuantizationType.Q8_0, "q4": GGMLQuantizationType.Q4_0}
D, N = 64, 96
MODEL = pathlib.Path(__file__).parents[1] / "sparseflash" / "models" / "tiny-relu2" / "model.safetensors"


def rel_err(y, y_ref):
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def awkward_rows(rows=24, d=128, seed=0):
    """Random rows plus the groups where rounding rules show: zeros, ties, negative extremes, one value."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((rows, d), dtype=np.float32) * rng.uniform(1e-3, 10, (rows, 1)).astype(np.float32)
    v[0, :32] = 0.0
    v[1, :32] = np.arange(32) / 4  # exact x.5 products for q8
    v[2, :32] = -np.arange(32) / 3  # largest magnitude negative
    v[3, 32:64] = 0.0
    v[3, 40] = 1e-3  # a lone value
    v[4, :32] = 1.0  # a constant group: q4 maps it to the -8 end
    v[5, :32] = np.where(np.arange(32) % 2, 2.0, -2.0)  # magnitude tie: the first one sets the sign
    return v


def to_gguf_blocks(parts, storage):
    """Our parts (rows, part_nbytes) rearranged as GGUF blocks [scale | values] per group of 32."""
    rows, groups = parts.shape[0], parts.shape[1] // (34 if storage == "q8" else 18)
    scales = parts[:, : 2 * groups].reshape(rows, groups, 2)
    values = parts[:, 2 * groups :].reshape(rows, groups, -1)
    return np.concatenate([scales, values], axis=2).reshape(rows, -1)


@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_quantize_is_gguf_block_for_block_and_dequantize_value_for_value(storage):
    v = awkward_rows()

    ours = quantize(v, storage)
    theirs = gguf.quants.quantize(v, GGUF_TYPE[storage])

    assert ours.shape == (24, part_nbytes(128, storage)) and ours.dtype == np.uint8
    np.testing.assert_array_equal(to_gguf_blocks(ours, storage), theirs)
    np.testing.assert_array_equal(dequantize(ours, storage), gguf.quants.dequantize(theirs, GGUF_TYPE[storage]))


@pytest.mark.parametrize(("storage", "bound"), [("q8", 0.01), ("q4", 0.15)])
def test_round_trip_error_on_the_bundled_models_ffn_weights(storage, bound):
    from safetensors.numpy import load_file

    weights = load_file(MODEL)
    up = weights["model.layers.0.mlp.up_proj.weight"].astype(np.float32)  # (n, d): rows along d
    down = weights["model.layers.0.mlp.down_proj.weight"].astype(np.float32).T  # (n, d): columns along d

    errors = [rel_err(dequantize(quantize(w, storage), storage), w) for w in (up, down)]

    assert all(0 < e <= bound for e in errors)


# d = 32, two neurons, non-gated: up_i then down_i, each [float16 scale | values].
GOLDEN_WEIGHTS = (
    np.stack([(np.arange(32) - 12) / 8, np.sin(np.arange(32))]).astype(np.float32),  # w_up (2, 32)
    np.stack([-(np.arange(32) % 5) / 4, (np.arange(32) - 20) / 16]).astype(np.float32).T,  # w_down (32, 2)
)
GOLDEN = {
    "q8": [
        "ca24b0b6bdc4cbd1d8dfe5ecf3f900070d141b21282f353c434a50575e646b72787f"
        "082000e0c0a18100e0c0a18100e0c0a18100e0c0a18100e0c0a18100e0c0a18100e0",
        "0820006b7312a086dd537e34bb81bc357e53db86a113746aff958def617922ac83cd"
        "0a2181878e949aa1a7adb4bac0c7cdd4dae0e7edf3fa00060d131920262c33394046",
    ],
    "q4": [
        "c0b46d6d5c5c5b4b4b3a3a392928181807070030" "68462402806846240280684624028068",
        "0030680f2f99f2f0861d1f7be4f0a43b0f5d0031" "6070718182829293a3a4a4b4b5c5c6c6",
    ],
}


@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_golden_bundle_bytes(storage):
    bundles = pack_bundles(*GOLDEN_WEIGHTS, dtype=storage)

    assert bundles.shape == (2, bundle_nbytes(32, False, storage)) and bundles.dtype == np.uint8
    assert [row.tobytes().hex() for row in bundles] == GOLDEN[storage]
    # byte 2 of q4 (first value byte) is values 0 and 16: -1.5 -> nibble 13, 0.5 -> nibble 6
    neuron = unpack_bundle(bundles[0], gated=False, storage=storage)
    np.testing.assert_allclose(neuron.up[[0, 16]], [-1.5, 0.5], atol=0.15)


def test_bundle_bytes_per_neuron_and_the_q4_target():
    assert bundle_nbytes(4096, True, "f16") == 3 * 4096 * 2
    assert bundle_nbytes(4096, True, "q8") == 3 * (128 * 2 + 4096)
    assert bundle_nbytes(4096, True, "q4") == 3 * (128 * 2 + 2048)
    assert bundle_nbytes(4096, False, "bf16") == 2 * 4096 * 2
    assert bundle_nbytes(4096, True, "q4") / bundle_nbytes(4096, True, "f16") <= 0.3  # 0.28125
    with pytest.raises(KernelInputError, match="d = 48"):
        bundle_nbytes(48, False, "q8")


@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_unpack_inverts_pack_up_to_quantization(storage):
    layer = random_layer(D, N, "swiglu", "f32", seed=3)

    bundles = pack_bundles(layer.w_up, layer.w_down, layer.w_gate, dtype=storage)
    back = unpack_bundles(bundles, gated=True, storage=storage)

    np.testing.assert_array_equal(back.w_up, dequantize(quantize(layer.w_up, storage), storage))
    np.testing.assert_array_equal(back.w_down, dequantize(quantize(layer.w_down.T, storage), storage).T)
    np.testing.assert_array_equal(back.w_gate, dequantize(quantize(layer.w_gate, storage), storage))


def run(backend, layer, x, slots, **kwargs):
    acts = np.full((x.shape[0], slots.size), np.nan, dtype=np.float32)
    y = get_backend(backend).sparse_ffn(x, layer.bundles, slots, layer.kind, storage=layer.storage,
                                        gate_bias=layer.gate_bias, up_bias=layer.up_bias, activations_out=acts,
                                        **kwargs)
    return y, acts


def tokens(batch, d=D, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, d), dtype=np.float32)


@pytest.mark.parametrize("storage", ["q8", "q4"])
@pytest.mark.parametrize(("kind", "batch", "biases"),
                         [("relu2", 1, False), ("relu", 3, True), ("reglu", 2, True), ("swiglu", 1, False),
                          ("geglu_tanh", 2, True)])
@pytest.mark.parametrize("backend", ["cpu", "dense"])
def test_kernels_match_the_dequantize_first_reference(backend, kind, batch, biases, storage):
    layer = random_layer(D, N, kind, storage, biases=biases, seed=batch)
    x, slots = tokens(batch), random_active_set(N, 0.45, seed=batch)

    y, acts = run(backend, layer, x, slots)
    y_ref, acts_ref = run("reference", layer, x, slots)

    assert y.shape == (batch, D) and y.dtype == np.float32
    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_allclose(acts, acts_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("storage", "tolerance"), [("q8", 0.02), ("q4", 0.25)])
def test_quantized_layer_stays_close_to_its_float_weights(storage, tolerance):
    exact = random_layer(D, N, "reglu", "f32", seed=6)
    quantized = random_layer(D, N, "reglu", storage, seed=6)  # same weights, quantized on packing
    x, slots = tokens(2), random_active_set(N, 0.3)

    error = rel_err(run("cpu", quantized, x, slots)[0], run("reference", exact, x, slots)[0])

    assert 0 < error <= tolerance


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_threads_split_quantized_neurons_without_changing_the_result(monkeypatch, threads):
    from sparseflash.kernels import cpu

    monkeypatch.setattr(cpu, "_threads", lambda: threads)
    layer = random_layer(D, 1024, "relu2glu", "q4", biases=True)
    x, slots = tokens(2), random_active_set(1024, 0.5)

    y, acts = run("cpu", layer, x, slots)
    y_again, _ = run("cpu", layer, x, slots)
    y_ref, acts_ref = run("reference", layer, x, slots)

    np.testing.assert_array_equal(y, y_again)
    assert rel_err(y, y_ref) <= 1e-5
    np.testing.assert_allclose(acts, acts_ref, rtol=1e-4, atol=1e-5)


def test_cpu_reads_readonly_memory_mapped_quantized_bundles_and_matrices(tmp_path):
    layer = random_layer(D, N, "swiglu", "q8")
    path = tmp_path / "bundles.bin"
    layer.bundles.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=layer.bundles.shape)
    x, slots = tokens(1), random_active_set(N, 0.3)

    y = get_backend("cpu").sparse_ffn(x, mapped, slots, "swiglu", storage="q8")
    y_linear = get_backend("cpu").quant_linear(x, mapped[:, : part_nbytes(D, "q8")].copy(), "q8")
    matrix = np.memmap(path, dtype=np.uint8, mode="r", shape=(layer.bundles.size // part_nbytes(D, "q8"),
                                                               part_nbytes(D, "q8")))
    y_mapped = get_backend("cpu").quant_linear(x, matrix, "q8")  # every part of every bundle as a matrix row

    assert rel_err(y, get_backend("reference").sparse_ffn(x, layer.bundles, slots, "swiglu", storage="q8")) <= 1e-5
    np.testing.assert_allclose(y_mapped[:, ::3], y_linear, rtol=1e-6)  # gate parts are every third row


def test_cpu_compiles_once_per_quantized_storage_not_per_call():
    from sparseflash.kernels import cpu, cpu_quant

    cpu.warmup(("q8", "q4"))
    compiled = len(cpu_quant._qneuron_range.signatures), len(cpu_quant._qlinear_range.signatures)
    for storage in ("q8", "q4"):
        for kind, batch in (("relu2", 1), ("swiglu", 4)):
            layer = random_layer(D, N, kind, storage, biases=True)
            run("cpu", layer, tokens(batch), random_active_set(N, 0.25))
            get_backend("cpu").quant_linear(tokens(batch), layer.bundles[:, : part_nbytes(D, storage)].copy(), storage)

    assert (len(cpu_quant._qneuron_range.signatures), len(cpu_quant._qlinear_range.signatures)) == compiled


@pytest.mark.parametrize("storage", ["q8", "q4"])
@pytest.mark.parametrize("backend", ["cpu", "dense"])
def test_quant_linear_matches_dequantize_then_matmul(backend, storage):
    rng = np.random.default_rng(4)
    w = quantize(rng.standard_normal((203, 96), dtype=np.float32), storage)  # 203 rows: not a multiple of 4
    x = rng.standard_normal((3, 96), dtype=np.float32)

    y = get_backend(backend).quant_linear(x, w, storage)
    y_ref = get_backend("reference").quant_linear(x, w, storage)

    assert y.shape == (3, 203) and y.dtype == np.float32
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(y_ref, x.astype(np.float64) @ dequantize(w, storage).T.astype(np.float64)) <= 1e-7


def test_quant_linear_on_one_token_many_threads_and_an_out_buffer(monkeypatch):
    from sparseflash.kernels import cpu

    monkeypatch.setattr(cpu, "_threads", lambda: 3)
    rng = np.random.default_rng(5)
    w = quantize(rng.standard_normal((1000, 64), dtype=np.float32), "q4")
    x = rng.standard_normal(64, dtype=np.float32)
    out = np.full(1000, np.nan, dtype=np.float32)

    y = get_backend("cpu").quant_linear(x, w, "q4", out=out)

    assert y is out
    assert rel_err(out, dequantize(w, "q4") @ x) <= 1e-5


def test_dequant_rows_decodes_only_the_rows_asked_for():
    rng = np.random.default_rng(6)
    w = quantize(rng.standard_normal((50, 64), dtype=np.float32), "q8")
    rows = np.array([7, 0, 7, 49])

    picked = dequant_rows(w, rows, "q8")

    np.testing.assert_array_equal(picked, dequantize(w, "q8")[rows])
    w[3, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # a bad row not asked for is not read
    np.testing.assert_array_equal(dequant_rows(w, rows, "q8"), picked)


def _corrupt(parts, row, byte_offset, value):
    parts = parts.copy()
    parts[row, byte_offset : byte_offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return parts


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_non_finite_scales_get_a_one_line_error_naming_row_and_part(storage, value):
    layer = random_layer(D, 8, "swiglu", storage)
    part = part_nbytes(D, storage)
    bad = _corrupt(layer.bundles, row=5, byte_offset=part + 2, value=value)  # up part, group 1
    w = _corrupt(quantize(layer.w_up, storage), row=2, byte_offset=0, value=value)

    failing = [
        (lambda: check_quantized(bad, D, True, storage), r"up part of bundle row 5: scale of group 1"),
        (lambda: unpack_bundles(bad, gated=True, storage=storage), r"up part of bundle row 5"),
        (lambda: get_backend("reference").sparse_ffn(tokens(1), bad, np.array([0, 5]), "swiglu", storage=storage),
         r"up part of bundle row 5"),
        (lambda: check_quantized_matrix(w, D, storage), r"row 2: scale of group 0"),
        (lambda: dequant_rows(w, [0, 2], storage), r"row 2: scale of group 0"),
        (lambda: get_backend("reference").quant_linear(tokens(1), w, storage), r"row 2: scale"),
    ]
    check_quantized(layer.bundles, D, True, storage)  # the intact bundles pass
    for call, message in failing:
        with pytest.raises(KernelInputError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)


def _quant_call(**change):
    layer = random_layer(D, 8, "relu2", "q4")
    call = {"x": tokens(2), "bundles": layer.bundles, "active_slots": np.array([0, 7]), "kind": "relu2",
            "storage": "q4", **change}
    return call


BAD_QUANT_CALLS = {
    "storage not named": ({"storage": None}, "pass storage='q8' or storage='q4'"),
    "q8 storage, q4 bytes": ({"storage": "q8"}, "q8 bundles for d=64, kind relu2 must be 136 bytes long, got bundle_len 72"),
    "float bundles named q4": ({"bundles": np.ones((8, 128), np.float16)}, "storage='q4' needs bundles of dtype uint8"),
    "bundles one byte short": ({"bundles": np.ones((8, 71), np.uint8)}, "must be 72 bytes long, got bundle_len 71"),
    "gated kind on non-gated bundles": ({"kind": "reglu"}, "must be 108 bytes long"),
    "d not a multiple of 32": ({"x": np.ones((2, 48), np.float32)}, "d = 48 must be a positive multiple of 32"),
    "x float64": ({"x": np.ones((2, 64))}, "x must be float32"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "dense"])
@pytest.mark.parametrize("case", sorted(BAD_QUANT_CALLS))
def test_bad_quantized_calls_raise_one_line_errors(backend, case):
    change, message = BAD_QUANT_CALLS[case]
    call = _quant_call(**change)
    x, bundles, slots, kind = (call.pop(key) for key in ("x", "bundles", "active_slots", "kind"))

    with pytest.raises(KernelInputError, match=message) as raised:
        get_backend(backend).sparse_ffn(x, bundles, slots, kind, **call)

    assert "\n" not in str(raised.value)


BAD_LINEAR_CALLS = {
    "row bytes": ({"w": np.zeros((4, 35), np.uint8)}, r"q8 matrix of 64 columns must be uint8 \(rows, 68\)"),
    "float w": ({"w": np.zeros((4, 68), np.float32)}, "must be uint8"),
    "float storage": ({"storage": "f16"}, "quant_linear storage must be one of"),
    "k not a multiple of 32": ({"x": np.ones((1, 40), np.float32)}, "k .x's last axis. = 40"),
    "x 3-D": ({"x": np.ones((1, 1, 64), np.float32)}, "x must be float32"),
    "out shape": ({"out": np.zeros((1, 5), np.float32)}, "out must be float32 of shape"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "dense"])
@pytest.mark.parametrize("case", sorted(BAD_LINEAR_CALLS))
def test_bad_quant_linear_calls_raise_one_line_errors(backend, case):
    change, message = BAD_LINEAR_CALLS[case]
    call = {"x": np.ones((1, 64), np.float32), "w": np.zeros((4, 68), np.uint8), "storage": "q8", **change}

    with pytest.raises(KernelInputError, match=message) as raised:
        get_backend(backend).quant_linear(call.pop("x"), call.pop("w"), call.pop("storage"), **call)

    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("storage", ["q8", "q4"])
def test_quantizing_refuses_what_it_cannot_store(storage):
    w = np.ones((4, 64), np.float32)
    cases = [
        (np.where(np.arange(64) == 9, np.nan, w), r"non-finite value nan at index \(0, 9\)"),
        (np.where(np.arange(64) == 9, -np.inf, w), "non-finite value -inf"),
        (w * 1e9, "overflows float16"),
        (np.ones((4, 40), np.float32), "d = 40 must be a positive multiple of 32"),
    ]
    for values, message in cases:
        with pytest.raises(KernelInputError, match=message):
            quantize(values, storage)
    with pytest.raises(KernelInputError, match="non-finite"):
        pack_bundles(w, np.where(w.T > 0, np.nan, w.T), dtype=storage)
