"""Quantized layouts (q8/q4 bundles, q8/q4 resident matrices): what the streamed engine computes equals
the dense model built from the same dequantized weights, and quantized data that is not finite is
refused in one line."""

import hashlib

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.errors import ArtefactError
from sparseflash.kernels import pack_bundles
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutFile, LayoutWriter
from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.runtime.layout_model import open_layout
from sparseflash.runtime.quant_weights import QuantMatrix
from sparseflash.runtime.session import open_streamed
from sparseflash.runtime.streamer import StreamError


def _teacher_forced(model, ids, prefill=5):
    cache = KVCache(model.config, ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache, start=0)]
    out += [model(ids[:, i : i + 1], cache=cache, start=i) for i in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family,dtype,resident", [("nemotron", "q8", "q8"), ("llama-silu", "q4", "f16"),
                                                   ("arcee", "q4", "q4")])
def test_streamed_quantized_layout_equals_its_dequantized_dense_model(tmp_path, family, dtype, resident):
    dense, path = tiny_layout(tmp_path, family, dtype=dtype, n_hot=4, resident_dtype=resident)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    ref_lm = open_layout(path, with_ffn=True)  # every bundle dequantized to f32, resident q8/q4 as stored
    try:
        assert isinstance(ref_lm.weights.layers[0].wq, QuantMatrix) == (resident != "f16")
        ref = Transformer(ref_lm.config, ref_lm.weights)(ids)
    finally:
        ref_lm.close()
    probe = open_streamed(path, 1 << 40, strategy="all", io_buffer_bytes=4096, io_threads=2)
    minimum = probe.engine.memory.minimum
    probe.close()
    model = open_streamed(path, minimum, strategy="all", io_buffer_bytes=4096, io_threads=2)  # evictions forced
    try:
        assert model.engine.memory.slots_per_layer == model.engine.policy.min_slots
        out = _teacher_forced(model.transformer, ids)
        assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())
        for cache in model.engine.caches:
            cache.check()
    finally:
        model.close()
    # and the quantized model stays close to the float checkpoint it came from
    full = Transformer(dense.config, dense.weights)(ids)
    rel = ((ref - full).norm() / full.norm()).item()
    assert rel < (0.02 if dtype == "q8" and resident == "q8" else 0.2)


def test_a_matrix_that_cannot_be_quantized_is_refused_in_one_line(tmp_path):
    from sparseflash.errors import SparseflashError

    with pytest.raises(SparseflashError, match=r"--resident-dtype q4: layers.0.wo has 80 columns, not a multiple of 32"):
        tiny_layout(tmp_path, "llama-relu2", dtype="f16", resident_dtype="q4")  # head_dim 20: 4 x 20 columns


def test_quantized_bundles_and_matrices_are_smaller_by_the_stated_ratios(tmp_path):
    _, f16 = tiny_layout(tmp_path, "llama-silu", dtype="f16")
    _, q4 = tiny_layout(tmp_path, "llama-silu", dtype="q4", resident_dtype="q8")
    with LayoutFile.open(f16) as a, LayoutFile.open(q4) as b:
        assert b.layers[0].bundle_bytes / a.layers[0].bundle_bytes == pytest.approx(18 / 64)  # 0.28x
        assert b.tensors["layers.0.wq"].nbytes / a.tensors["layers.0.wq"].nbytes == pytest.approx(34 / 64)
        assert b.tensors["layers.0.wq"].shape == a.tensors["layers.0.wq"].shape  # the logical shape


def test_quantized_golden_bytes(tmp_path):
    """A pinned q8 layer and q4 matrix: the container bytes and the quantization arithmetic together."""
    w = (np.arange(3 * 32, dtype=np.float32).reshape(3, 32) - 40) / 16  # (neurons, d)
    writer = LayoutWriter(tmp_path / "q.sflash", {"model": "golden-quantized"})
    writer.add_tensor("layers.0.perm", np.array([1, 2, 0], dtype=np.int32))
    writer.add_ffn_layer(d_model=32, n_neurons=3, gated=False, dtype="q8", bundle_bytes=schema.bundle_bytes(32, False, "q8"),
                         permutation="layers.0.perm", bundles=pack_bundles(w, w.T, dtype="q8"), chunk_neurons=2)
    from sparseflash.kernels import quantize

    writer.add_tensor("wq4", quantize(w, "q4"), "q4", shape=(3, 32))
    writer.write()
    blob = (tmp_path / "q.sflash").read_bytes()
    assert (len(blob), hashlib.sha256(blob).hexdigest()[:16]) == (8844, "e907afe16bff53cf")
    with LayoutFile.open(tmp_path / "q.sflash", verify=True) as f:
        layer = f.layers[0]
        assert (layer.dtype, layer.bundle_bytes) == ("q8", 68)  # [up | down] parts of 34 bytes
        up0 = blob[layer.offset : layer.offset + 34]  # neuron 0's up part: scale, then 32 int8
        # row 0 is (-40..-9)/16: absmax 2.5, scale 2.5/127 as float16, first value -2.5 -> -127
        assert np.frombuffer(up0[:2], "<f2")[0] == np.float16(2.5 / 127)
        assert np.frombuffer(up0[2:], np.int8)[[0, 31]].tolist() == [-127, -29]  # -0.5625 / scale = -28.6
        wq4 = f.tensor("wq4")
        assert f.tensors["wq4"].shape == (3, 32) and wq4.shape == (3, 18)  # one group: scale + 16 bytes


def _corrupt_scale_layout(tmp_path, where: str):
    """A q8 layout whose first neuron's up-part scale (or wq's first row scale) is NaN, written with a
    matching digest and crc: what a writer bug would produce."""
    from sparseflash.layout import build, layout_weights

    nan = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    if where == "bundle":
        real = build.pack_bundles

        def bad_pack(*args, **kw):
            rows = real(*args, **kw).copy()
            rows[0, :2] = nan
            return rows
        build.pack_bundles = bad_pack
    else:
        real = layout_weights.quantize  # resident tensors are quantized as they are staged

        def bad_quantize(values, storage):
            rows = real(values, storage).copy()
            if values.shape == (64, 64):
                rows[0, :2] = nan
            return rows
        layout_weights.quantize = bad_quantize
    try:
        return tiny_layout(tmp_path, "nemotron-tied", dtype="q8", n_hot=0, resident_dtype="q8")[1]
    finally:
        if where == "bundle":
            build.pack_bundles = real
        else:
            layout_weights.quantize = real


def test_non_finite_quantized_data_with_valid_checksums_is_refused(tmp_path):
    bad_bundle = _corrupt_scale_layout(tmp_path / "a", "bundle")
    model = open_streamed(bad_bundle, "100%ffn", strategy="all")
    try:
        with pytest.raises(StreamError, match=r"layer 0, stored neuron 0: holds non-finite weights"):
            model.transformer(torch.arange(3)[None])
    finally:
        model.close()
    bad_matrix = _corrupt_scale_layout(tmp_path / "b", "matrix")
    with pytest.raises(ArtefactError, match=r"tensor 'layers.0.wq'.*scale.*nan"):
        open_layout(bad_matrix)
