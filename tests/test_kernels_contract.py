"""The kernel contract: bundle packing, storage rounding, input validation, back-end selection."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparseflash.kernels as kernels
from sparseflash.kernels import (
    BackendUnavailableError,
    KernelInputError,
    bf16_bits_from_f32,
    f32_from_bf16_bits,
    ffn_kind,
    get_backend,
    pack_bundles,
    unpack_bundle,
    unpack_bundles,
)


def weights(n=6, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in ((n, d), (d, n), (n, d))]


def test_bundle_row_is_gate_then_up_then_down_column():
    w_up, w_down, w_gate = weights()

    bundles = pack_bundles(w_up, w_down, w_gate, dtype="f32")

    assert bundles.shape == (6, 12) and bundles.dtype == np.float32
    np.testing.assert_array_equal(bundles[2], np.concatenate([w_gate[2], w_up[2], w_down[:, 2]]))
    neuron = unpack_bundle(bundles[2], gated=True)
    np.testing.assert_array_equal(neuron.down, w_down[:, 2])


@pytest.mark.parametrize("storage", ["f32", "f16", "bf16"])
def test_unpack_inverts_pack(storage):
    w_up, w_down, _ = weights()

    bundles = pack_bundles(w_up, w_down, dtype=storage)
    back = unpack_bundles(bundles, gated=False, storage=storage)

    assert back.w_gate is None and back.w_down.shape == (4, 6)
    tolerance = {"f32": 0, "f16": 1e-3, "bf16": 8e-3}[storage]
    np.testing.assert_allclose(back.w_up, w_up, rtol=tolerance, atol=1e-6)
    np.testing.assert_allclose(back.w_down, w_down, rtol=tolerance, atol=1e-6)


def test_pack_accepts_torch_bfloat16_tensors_and_keeps_their_bits():
    w_up, w_down, _ = (torch.from_numpy(w).to(torch.bfloat16) for w in weights())

    bundles = pack_bundles(w_up, w_down, dtype="bf16")

    assert bundles.dtype == np.uint16
    np.testing.assert_array_equal(bundles[:, :4], w_up.view(torch.int16).numpy().view(np.uint16))


def test_bf16_rounding_matches_torch():
    values = np.random.default_rng(1).standard_normal(10_000, dtype=np.float32) * 1e3
    values[:4] = [np.inf, -np.inf, 0.0, -0.0]

    bits = bf16_bits_from_f32(values)

    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    assert np.isnan(f32_from_bf16_bits(bf16_bits_from_f32(np.array([np.nan], np.float32)))).all()


def test_kind_names_resolve_to_activation_and_gating():
    assert ffn_kind("swiglu") == kernels.FFNKind("silu", gated=True)
    assert ffn_kind("relu2glu").name == "relu2glu"
    with pytest.raises(KernelInputError, match="unknown FFN kind"):
        ffn_kind("swish")


def _valid_call():
    layer_bundles = pack_bundles(*weights(n=8, d=4)[:2], dtype="f16")  # (8, 8) float16, relu2
    return {"x": np.ones((2, 4), np.float32), "bundles": layer_bundles, "active_slots": np.array([0, 7]),
            "kind": "relu2"}


BAD_CALLS = {
    "x float64": ({"x": np.ones((2, 4))}, "x must be float32"),
    "x wrong d": ({"x": np.ones((2, 5), np.float32)}, "x must be float32"),
    "x empty batch": ({"x": np.ones((0, 4), np.float32)}, "x must be float32"),
    "bundles 1-D": ({"bundles": np.ones(8, np.float16)}, "bundles must be 2-D"),
    "bundles float64": ({"bundles": np.ones((8, 8))}, "storage dtype"),
    "bf16 not named": ({"bundles": np.ones((8, 8), np.uint16)}, "storage='bf16'"),
    "storage mismatch": ({"storage": "bf16"}, "storage='bf16' needs"),
    "odd bundle_len": ({"bundles": np.ones((8, 9), np.float16)}, "multiple of 2"),
    "slot too large": ({"active_slots": np.array([0, 8])}, r"slot 8 outside \[0, 8\)"),
    "slot negative": ({"active_slots": np.array([-1])}, "slot -1 outside"),
    "slots float": ({"active_slots": np.array([0.0, 1.0])}, "integer"),
    "slots 2-D": ({"active_slots": np.zeros((1, 2), np.int64)}, "1-D integer"),
    "up_bias length": ({"up_bias": np.zeros(7, np.float32)}, "up_bias must be float32 of shape"),
    "gate_bias, not gated": ({"gate_bias": np.zeros(8, np.float32)}, "not gated"),
    "out shape": ({"out": np.zeros((2, 5), np.float32)}, "out must be float32"),
    "activations_out shape": ({"activations_out": np.zeros((2, 3), np.float32)}, "activations_out must be"),
    "unknown kind": ({"kind": "relu3"}, "unknown FFN kind"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "dense"])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_one_line_value_error(backend, case):
    change, message = BAD_CALLS[case]
    call = {**_valid_call(), **change}
    x, bundles, slots, kind = (call.pop(key) for key in ("x", "bundles", "active_slots", "kind"))

    with pytest.raises(KernelInputError, match=message) as raised:
        get_backend(backend).sparse_ffn(x, bundles, slots, kind, **call)

    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_unknown_backend_and_missing_gpu_are_typed_errors(monkeypatch):
    from sparseflash.kernels import cuda

    with pytest.raises(KernelInputError, match="unknown back end"):
        get_backend("tpu")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="no GPU"):
        get_backend("cuda")
    assert "cuda" not in kernels.available_backends()


def test_importing_kernels_loads_no_compiler_and_no_torch():
    code = "import sys, sparseflash.kernels; print([m for m in ('numba', 'torch') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert loaded.strip() == "[]"


def test_kernels_import_nothing_else_from_the_package():
    source_dir = pathlib.Path(kernels.__file__).parent
    for source in source_dir.glob("*.py"):
        for module in re.findall(r"^\s*(?:from|import) (sparseflash[\w.]*)", source.read_text(), re.M):
            assert module.startswith("sparseflash.kernels"), f"{source.name} imports {module}"


@pytest.mark.parametrize("storage", ["f16", "bf16", "f32"])
def test_first_non_finite_row_finds_inf_and_nan_in_each_float_storage(storage):
    from sparseflash.kernels import from_f32
    from sparseflash.kernels.finite import first_non_finite_row

    values = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32) * 100
    values[:, 0] = 65000.0 if storage == "f16" else 3e38  # large but finite: not flagged
    assert first_non_finite_row(from_f32(values, storage), storage) is None
    for bad, row in ((np.inf, 31), (-np.inf, 17), (np.nan, 5)):
        values[row, 77] = bad
        assert first_non_finite_row(from_f32(values, storage), storage) == row
    with pytest.raises(ValueError, match="storage"):
        first_non_finite_row(values, "q8")
    with pytest.raises(ValueError, match="2-D"):
        first_non_finite_row(values[0], "f32")


def test_first_non_finite_row_with_an_index_reads_only_those_rows():
    from sparseflash.kernels.finite import first_non_finite_row

    rows = np.ones((6, 8), dtype=np.float16)
    rows[1, 3] = np.nan
    rows[4, 0] = np.inf
    assert first_non_finite_row(rows, "f16", np.array([5, 2, 0])) is None  # the bad rows are not asked for
    assert first_non_finite_row(rows, "f16", np.array([5, 4, 1])) == 1  # k of rows[index[k]]
    assert first_non_finite_row(rows, "f16", np.array([], dtype=np.int64)) is None
    with pytest.raises(ValueError, match="index"):
        first_non_finite_row(rows, "f16", np.array([6]))
