"""Quantized GGUF tensors: per-type round trips, an independent block decoder, malformed blocks, whole models."""

import json
import struct

import numpy as np
import pytest
import torch
from gguf_blocks import LAYOUT, decode, random_blocks
from test_gguf import _assert_one_line_error, _hf_folder

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.checkpoint import default_model_dir
from sparseflash.model.generate import Sampling, generate
from sparseflash.model.gguf_export import export_gguf
from sparseflash.model.gguf_import import load_gguf
from sparseflash.model.gguf_tensors import GGUFTensors, dequantizable_types
from sparseflash.model.transformer import Transformer
from sparseflash.tools.cli import main

# the types gguf-py can also quantize, with the format's bound on |error| / the absmax of its block of 32:
# half a step of the integer grid (Q4_0 and Q5_0 a whole step: their scale maps the absmax to -8 / -16, so
# the other sign clips at +7 / +15), plus the float16 rounding of the scale
_F16_SCALE = 2.0**-10
QUANTIZABLE = {"Q8_0": 0.5 / 127 + _F16_SCALE, "Q5_0": 1 / 16 + _F16_SCALE, "Q5_1": 0.5 / 15.5 + _F16_SCALE,
               "Q4_0": 1 / 8 + _F16_SCALE, "Q4_1": 0.5 / 7.5 + _F16_SCALE, "BF16": 2.0**-8, "F16": 2.0**-11}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def write_tensors(path, tensors: dict):
    """A GGUF holding raw tensors: name -> (array, GGML type name); quantized arrays are (rows, bytes)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(path, "llama")
    for name, (array, kind) in tensors.items():
        raw = None if kind in ("F32", "F16") else GGMLQuantizationType[kind]
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _quantize(values: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(values.astype(np.float32), GGMLQuantizationType[kind])


# --- per-type round trips ----------------------------------------------------------------------------------

def test_every_type_the_issue_names_is_readable():
    assert set(QUANTIZABLE) | set(K_QUANTS) <= dequantizable_types()


@pytest.mark.parametrize("kind", sorted(QUANTIZABLE))
def test_quantized_round_trip_matches_gguf_and_the_original(tmp_path, kind):
    values = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32)
    stored = _quantize(values, kind)
    tensors = GGUFTensors(write_tensors(tmp_path / "q.gguf", {"w": (stored, kind)}))
    info = tensors.info("w")
    assert (info.type_name, info.shape) == (kind, (6, 256))
    block, size = (32, LAYOUT[kind][1]) if kind in LAYOUT else (1, 2)
    assert info.nbytes == 6 * 256 // block * size
    got = tensors.load("w")
    assert got.dtype == torch.float32 and got.shape == (6, 256)
    if kind in LAYOUT:  # the file's bytes decoded element by element, independently of gguf-py
        assert np.array_equal(got.numpy().ravel(), decode(kind, stored).astype(np.float32))
    else:
        half = torch.float16 if kind == "F16" else torch.bfloat16
        assert torch.equal(got, torch.from_numpy(values).to(half).float())
    err = np.abs(got.numpy() - values).reshape(-1, 32).max(axis=1)
    rel = (err / np.abs(values).reshape(-1, 32).max(axis=1)).max()
    assert rel <= QUANTIZABLE[kind], f"{kind}: error {rel:.4f} of the block absmax"


@pytest.mark.parametrize("kind", K_QUANTS)
def test_k_quant_blocks_decode_like_ggml_reference(tmp_path, kind):
    blocks = random_blocks(kind, n_blocks=8, seed=3)  # 2 rows of 4 super-blocks (1024 values each)
    tensors = GGUFTensors(write_tensors(tmp_path / "k.gguf", {"w": (blocks.reshape(2, -1), kind)}))
    assert tensors.info("w").shape == (2, 1024) and tensors.info("w").nbytes == blocks.size
    got = tensors.load("w").numpy().ravel().astype(np.float64)
    expected = decode(kind, blocks)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_independent_decoder_catches_a_swapped_layout():
    """The oracle itself is sensitive: reading Q4_K's d and dmin the other way round gives other values."""
    blocks = random_blocks("Q4_K", 2, seed=5)
    swapped = blocks.copy()
    swapped[:, 0:2], swapped[:, 2:4] = blocks[:, 2:4], blocks[:, 0:2]
    assert not np.allclose(decode("Q4_K", blocks), decode("Q4_K", swapped))


def test_info_lists_types_without_reading_data(tmp_path):
    path = write_tensors(tmp_path / "m.gguf", {
        "a": (random_blocks("Q6_K", 2).reshape(1, -1), "Q6_K"),
        "b": (_quantize(np.ones((2, 64)), "Q8_0"), "Q8_0"),
        "c": (np.ones(7, np.float32), "F32"),
        "d": (_quantize(np.ones((4, 32)), "Q8_0"), "Q8_0")})
    tensors = GGUFTensors(path)
    assert tensors.type_counts() == {"Q8_0": 2, "Q6_K": 1, "F32": 1}
    assert [(i.name, i.type_name, i.shape) for i in tensors] == [
        ("a", "Q6_K", (1, 512)), ("b", "Q8_0", (2, 64)), ("c", "F32", (7,)), ("d", "Q8_0", (4, 32))]


# --- malformed quantized data ------------------------------------------------------------------------------

def _q8_file(tmp_path, rows=4):
    values = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    return write_tensors(tmp_path / "q8.gguf", {"blk.0.ffn_down.weight": (_quantize(values, "Q8_0"), "Q8_0"),
                                                "blk.0.ffn_up.weight": (_quantize(values, "Q8_0"), "Q8_0")})


def _first_block_at(path, name) -> int:
    from sparseflash.model.gguf_format import check_gguf_file

    return next(t.start for t in check_gguf_file(path).tensors if t.name == name)


@pytest.mark.parametrize("bits, what", [(0x7E00, "NaN"), (0x7C00, "+inf"), (0xFC00, "-inf")])
def test_non_finite_block_scale_is_named(tmp_path, capsys, bits, what):
    path = _q8_file(tmp_path)
    data = bytearray(path.read_bytes())
    at = _first_block_at(path, "blk.0.ffn_up.weight") + 34  # second block's float16 scale
    data[at : at + 2] = struct.pack("<H", bits)
    path.write_bytes(data)
    tensors = GGUFTensors(path)
    tensors.load("blk.0.ffn_down.weight")  # the other tensor is fine
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' \(Q8_0\) has 32 non-finite values"):
        tensors.load("blk.0.ffn_up.weight")


def test_truncated_blocks_are_named_with_their_type(tmp_path):
    path = _q8_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last tensor loses part of its last block
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' \(Q8_0, 272 bytes .* the file is truncated"):
        GGUFTensors(path)


def test_wrong_block_count_is_named(tmp_path):
    """A shape declaring fewer rows than the data holds (3 instead of 4 rows of 2 blocks)."""
    path = _q8_file(tmp_path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    dims_at = data.index(name) + len(name) + 4  # after the name: n_dims u32, then ne[0], ne[1] u64
    assert struct.unpack_from("<QQ", data, dims_at) == (64, 4)
    struct.pack_into("<Q", data, dims_at + 8, 3)
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_down.weight' \(Q8_0, shape \[3, 64\]\) declares 6 blocks "
                                              r"\(204 bytes\) but its data region holds 288 bytes"):
        GGUFTensors(path)


def test_row_that_is_not_whole_blocks_is_named(tmp_path):
    path = _q8_file(tmp_path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    struct.pack_into("<Q", data, data.index(name) + len(name) + 4, 48)  # ne[0] 64 -> 48
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' \(Q8_0\) has rows of 48 values, not a whole "
                                              r"number of Q8_0 blocks of 32"):
        GGUFTensors(path)


def test_type_gguf_py_cannot_read_is_named(tmp_path):
    from gguf import GGMLQuantizationType

    kinds = [k.name for k in GGMLQuantizationType if k.name not in dequantizable_types()]
    assert "Q8_K" in kinds  # llama.cpp's internal dot-product type; never in published files
    path = write_tensors(tmp_path / "u.gguf", {"w": (np.zeros((1, 292), np.uint8), "Q8_K"),
                                               "v": (np.ones(3, np.float32), "F32")})
    tensors = GGUFTensors(path)
    assert tensors.load("v").tolist() == [1, 1, 1]
    with pytest.raises(UnsupportedModelError, match=r"tensor 'w' has GGML type Q8_K, which sparseflash cannot"):
        tensors.load("w")


# --- whole models ------------------------------------------------------------------------------------------

def requantize_gguf(src, dst, kind: str, float_dst=None):
    """Copy a GGUF with every matrix quantized to ``kind`` by gguf-py; with ``float_dst`` also write the
    float32 GGUF of exactly the dequantized values (the reference the quantized file must equal)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    writers = [GGUFWriter(p, reader.fields["general.architecture"].contents()) for p in (dst, float_dst) if p]
    for w in writers:
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 2 and t.tensor_type.name == "F32":
            q = _quantize(data, kind)
            writers[0].add_tensor(t.name, q, raw_dtype=GGMLQuantizationType[kind])
            if float_dst:
                writers[1].add_tensor(t.name, dequantize(q, GGMLQuantizationType[kind]))
        else:
            for w in writers:
                w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for w in writers:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("family", ["arcee", "llama-silu", "nemotron-gqa"])
def test_quantized_model_generates_like_its_dequantized_float_version(tmp_path, family, kind):
    folder = _hf_folder(family, tmp_path / family)
    f32 = export_gguf(folder, tmp_path / "f32.gguf").path
    requantize_gguf(f32, tmp_path / "q.gguf", kind, float_dst=tmp_path / "deq.gguf")
    q, ref = load_gguf(tmp_path / "q.gguf"), load_gguf(tmp_path / "deq.gguf")
    assert GGUFTensors(tmp_path / "q.gguf").info("blk.1.ffn_down.weight").type_name == kind
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b = Transformer(q.config, q.weights)(ids), Transformer(ref.config, ref.weights)(ids)
    assert torch.equal(a, b)
    ga = generate(Transformer(q.config, q.weights), ids[0, :8].tolist(), 16, Sampling(greedy=True), stop_at_eos=False)
    gb = generate(Transformer(ref.config, ref.weights), ids[0, :8].tolist(), 16, Sampling(greedy=True),
                  stop_at_eos=False)
    assert ga.tokens == gb.tokens
    # and quantization did change the model (Q8_0 by little, Q4_0 by more), so the check above is not vacuous
    f = load_gguf(f32)
    drift = (Transformer(f.config, f.weights)(ids) - a).abs().max().item()
    assert drift > 0


def test_bundled_model_quantized_q8_0_runs_from_the_cli(tmp_path, capsys):
    f32 = export_gguf(default_model_dir(), tmp_path / "f32.gguf").path
    requantize_gguf(f32, tmp_path / "q8.gguf", "Q8_0", float_dst=tmp_path / "deq.gguf")
    args = ["run", "-p", "The os module", "-n", "16", "--greedy", "--ignore-eos", "--json"]
    capsys.readouterr()
    outs = []
    for path in ("q8.gguf", "deq.gguf", "f32.gguf"):
        assert main([*args, "-m", str(tmp_path / path)]) == 0
        outs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outs[0] == outs[1]
    assert main(["info", "-m", str(tmp_path / "q8.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensor_types"] == {"Q8_0": 38, "F32": 26}  # 6 per layer + embedding + output; norms
    assert {"name": "blk.0.ffn_down.weight", "type": "Q8_0", "shape": [256, 1024]} in info["tensors"]
    assert main(["info", "-m", str(tmp_path / "q8.gguf")]) == 0
    assert "tensor types: 38 Q8_0, 26 F32" in capsys.readouterr().out


def test_quantized_cli_error_is_one_line(tmp_path, capsys):
    path = _q8_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    _assert_one_line_error(capsys, ["info", "-m", str(path)], "'blk.0.ffn_up.weight' (Q8_0, 272 bytes")



def test_info_of_a_checkpoint_folder_counts_safetensors_dtypes(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensor_types"] == {"F16": 63}  # the bundled model is stored in float16
    assert {"name": "model.layers.0.mlp.down_proj.weight", "type": "F16", "shape": [256, 1024]} in info["tensors"]


# --- llama.cpp (bench extra) -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def dequantize_gguf(src, dst):
    """The float32 GGUF of a quantized one: every tensor dequantized by gguf-py, metadata copied."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    w = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(dequantize(np.array(t.data), t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_llama_cpp_quantized_file_runs_alike_in_both(llama_cpp, tmp_path, ftype):
    """A file quantized by llama.cpp's own quantizer: sparseflash's logits are within a tolerance of llama.cpp's
    (which also quantizes the activations to 8 bits in its dot products; logits here reach about 20), and
    its greedy tokens equal those of the gguf-py-dequantized float32 file."""
    import ctypes

    from test_gguf import llama_cpp_logits

    from sparseflash.model.loader import open_dense
    from sparseflash.model.text import read_text

    f32 = export_gguf(default_model_dir(), tmp_path / "f32.gguf").path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 1
    path = tmp_path / f"{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) == 0
    model = open_dense(path)
    tokens = model.tokenizer.encode(read_text(default_model_dir() / "heldout.txt.zst"))[:100]
    ours = model.transformer()(torch.tensor([tokens]))[0].numpy()
    theirs = llama_cpp_logits(llama_cpp, path, tokens)
    diff = np.abs(ours - theirs)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    assert diff.mean() <= 0.05 and diff.max() <= 1.0 and top1 >= 0.95, (diff.mean(), diff.max(), top1)
    ref = open_dense(dequantize_gguf(path, tmp_path / "deq.gguf"))
    prompt = tokens[:8]
    a = generate(model.transformer(), prompt, 24, Sampling(greedy=True), stop_at_eos=False).tokens
    b = generate(ref.transformer(), prompt, 24, Sampling(greedy=True), stop_at_eos=False).tokens
    assert a == b


# --- transformers (dev extra, with accelerate) as a whole-model oracle ------------------------------------

def _with_random_blocks(src, dst, kind: str):
    """The bundled model's GGUF with every matrix replaced by valid random ``kind`` blocks of its shape."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    w = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    values, size = LAYOUT[kind][:2]
    for i, t in enumerate(reader.tensors):
        data = np.array(t.data)
        if data.ndim == 2:
            rows, cols = data.shape
            blocks = random_blocks(kind, rows * cols // values, seed=i, scale=2e-4 if values == 256 else 2e-3)
            w.add_tensor(t.name, blocks.reshape(rows, cols // values * size), raw_dtype=GGMLQuantizationType[kind])
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])  # every K type block by block: test_k_quant_blocks_decode_like_ggml
def test_k_quant_model_gives_the_logits_of_transformers_gguf_loader(tmp_path, kind):
    """transformers dequantizes GGUF blocks with its own torch code (not gguf-py) and maps nemotron's tensors
    itself: its logits for a whole K-quant model must be sparseflash's (equal weights; forward within 1e-5)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM

    f32 = export_gguf(default_model_dir(), tmp_path / "f32.gguf").path
    path = _with_random_blocks(f32, tmp_path / f"{kind}.gguf", kind)
    ours = load_gguf(path)
    assert GGUFTensors(path).type_counts() == {kind: 38, "F32": 26}
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits[0]
    got = Transformer(ours.config, ours.weights)(ids)[0]
    assert expected.abs().max() > 0.1 and torch.isfinite(expected).all()  # a model that computes something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
