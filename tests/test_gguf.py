"""GGUF export and import: exact round trips, llama.cpp's conventions, llama.cpp itself, and bad files."""

import json
import struct
import time

import numpy as np
import pytest
import torch
from tiny_models import BUNDLED_TOKENIZER, FAMILIES, make_hf_model, save_hf_model

from sparseflash.errors import CheckpointError
from sparseflash.model.checkpoint import default_model_dir, load_checkpoint
from sparseflash.model.gguf_export import export_gguf
from sparseflash.model.gguf_format import check_gguf_file
from sparseflash.model.gguf_import import load_gguf
from sparseflash.model.gguf_mapping import permute_qk, unpermute_qk
from sparseflash.model.loader import open_dense
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.transformer import Transformer
from sparseflash.tools.cli import main

# families llama.cpp can run; "nemotron-gqa" is tiny_models' nemotron with heads x head_dim == hidden
GGUF_FAMILIES = {
    "nemotron-gqa": ("nemotron", dict(hidden_act="relu2", partial_rotary_factor=0.5, num_key_value_heads=2,
                                      tie_word_embeddings=False)),
    "nemotron-tied": FAMILIES["nemotron-tied"],
    "arcee": FAMILIES["arcee"],
    "arcee-yarn": FAMILIES["arcee-yarn"],
    "llama-silu": FAMILIES["llama-silu"],
}
NORM_FIELDS = ("attn_norm_w", "ffn_norm_w", "final_norm_w")
SAMPLE_TEXT = "The os module provides a portable way of using operating system dependent functionality.\n\tx = 42"


def _hf_folder(family, folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILIES, family, GGUF_FAMILIES[family])
        return save_hf_model(make_hf_model(family), folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (HF folder, f32 .gguf), built once per module."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family in GGUF_FAMILIES:
        folder = _hf_folder(family, root / family)
        out[family] = folder, export_gguf(folder, root / f"{family}.gguf").path
    return out


def _rewrite_gguf(src, dst, drop=(), set_kv=None):
    """Copy a GGUF through gguf's reader and writer, dropping keys or tensors, replacing keys."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if set_kv and name in set_kv:
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    for name, (value, vtype) in (set_kv or {}).items():
        writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# --- round trips -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_export_import_round_trips_every_tensor(exported, family):
    folder, path = exported[family]
    src, back = load_checkpoint(folder), load_gguf(path)
    assert back.config == src.config
    a, b = src.weights.named(), back.weights.named()
    assert a.keys() == b.keys()
    for name, t in a.items():
        if src.config.norm == "layernorm1p" and name.split(".")[-1] in NORM_FIELDS:
            # GGUF holds the effective LayerNorm1P weight w + 1, which is what comes back exactly
            assert torch.equal(b[name] + 1, t + 1), name
        else:
            assert torch.equal(b[name], t), name
    assert (back.weights.lm_head is back.weights.embed) == src.config.tie_word_embeddings
    assert back.tokenizer_json == BUNDLED_TOKENIZER.read_text() and not back.tokenizer_rebuilt


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_imported_gguf_gives_the_source_logits(exported, family):
    folder, path = exported[family]
    src, back = load_checkpoint(folder), load_gguf(path)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    diff = (Transformer(back.config, back.weights)(ids) - Transformer(src.config, src.weights)(ids)).abs().max()
    assert diff.item() <= 1e-6, f"{family}: max |logit diff| {diff.item()}"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_export_rounds_matrices_and_keeps_vectors(exported, tmp_path, dtype):
    from gguf import GGUFReader

    folder, _ = exported["llama-silu"]
    path = export_gguf(folder, tmp_path / "m.gguf", dtype).path
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_up.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    half = torch.float16 if dtype == "f16" else torch.bfloat16
    src, back = load_checkpoint(folder).weights.named(), load_gguf(path).weights.named()
    for name, t in src.items():
        expected = t.to(half).float() if t.dim() == 2 else t
        assert torch.equal(back[name], expected), name


def test_gguf_file_follows_llama_cpp_conventions(exported):
    """Raw tensors as llama.cpp reads them: norm + 1 for nemotron, q/k permuted for arcee, dims reversed."""
    from gguf import GGUFReader

    for family, permuted in (("nemotron-gqa", False), ("arcee", True)):
        folder, path = exported[family]
        src = load_checkpoint(folder)
        layer = src.weights.layers[1]
        raw = {t.name: t for t in GGUFReader(path).tensors}
        assert path.read_bytes()[:16] == b"GGUF" + struct.pack("<IQ", 3, len(raw))  # magic, version, tensor count
        q = raw["blk.1.attn_q.weight"]
        assert list(q.shape) == [64, 64] and list(raw["blk.1.attn_k.weight"].shape) == [64, 32]  # ne: (in, out)
        up = raw["blk.1.ffn_up.weight"]
        assert list(up.shape) == [64, 160] and up.data.shape == (160, 64)  # the numpy view is in torch order
        k = torch.from_numpy(np.array(raw["blk.1.attn_k.weight"].data))
        expected_k = permute_qk(layer.wk, 2) if permuted else layer.wk
        assert torch.equal(k, expected_k)
        norm = torch.from_numpy(np.array(raw["blk.1.attn_norm.weight"].data))
        assert torch.equal(norm, layer.attn_norm_w + 1 if src.config.norm == "layernorm1p" else layer.attn_norm_w)


def test_permutation_matches_convert_hf_to_gguf():
    rows = torch.arange(8.0)[:, None]  # two heads of four rows
    assert permute_qk(rows, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = torch.randn(96, 5)
    assert torch.equal(unpermute_qk(permute_qk(x, 4), 4), x)


def test_bundled_model_round_trips_and_generates_identically(tmp_path, capsys):
    path = tmp_path / "tiny-relu2.gguf"
    assert main(["export-gguf", "-m", str(default_model_dir()), "-o", str(path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-relu2.gguf"]  # no temporary file left behind
    args = ["run", "-p", "The os module", "-n", "12", "--greedy", "--ignore-eos", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main([*args, "-m", str(path)]) == 0
    from_gguf = json.loads(capsys.readouterr().out)
    assert from_gguf["tokens"] == from_folder["tokens"] and from_gguf["text"] == from_folder["text"]
    assert main(["info", "-m", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "nemotron" and info["tied_embeddings"] and info["source"] == str(path)


def test_gguf_to_gguf_reexport_is_identical_in_weights(exported, tmp_path):
    _, path = exported["arcee"]
    again = export_gguf(path, tmp_path / "again.gguf").path
    a, b = load_gguf(path).weights.named(), load_gguf(again).weights.named()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_rebuilt_from_ggml_vocab_encodes_like_the_original(exported, tmp_path):
    _, path = exported["arcee"]
    bare = _rewrite_gguf(path, tmp_path / "bare.gguf", drop={"tokenizer.huggingface.json"})
    model = load_gguf(bare)
    assert model.tokenizer_rebuilt
    rebuilt = TextTokenizer.from_json(model.tokenizer_json)
    original = TextTokenizer.from_file(BUNDLED_TOKENIZER)
    for text in (SAMPLE_TEXT, "  leading spaces, ünïcödé and <|endoftext|> in the middle", "def f(x):\n    return x"):
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids
        assert rebuilt.decode(ids) == original.decode(ids)


def test_gguf_without_any_tokenizer_is_refused(exported, tmp_path):
    _, path = exported["arcee"]
    drop = {"tokenizer.huggingface.json", "tokenizer.ggml.model", "tokenizer.ggml.tokens"}
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_gguf(_rewrite_gguf(path, tmp_path / "notok.gguf", drop=drop))


# --- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, needle", [
    ("nemotron", "needs heads x head_dim == hidden_size (4 x 24 = 96, hidden_size 64)"),
    ("llama-relu", "reglu FFN cannot be expressed"),
    ("llama-gelu", "geglu FFN cannot be expressed"),
    ("mistral-silu", "'mistral' is not supported"),
], ids=lambda v: v if v in FAMILIES else "")
def test_export_refuses_what_llama_cpp_cannot_run(tmp_path, capsys, family, needle):
    folder = save_hf_model(make_hf_model(family), tmp_path / family)
    out = tmp_path / "x.gguf"
    capsys.readouterr()
    assert main(["export-gguf", "-m", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# --- malformed files ---------------------------------------------------------------------------------------

def _patch(data: bytes, at: int, fmt: str, value) -> bytes:
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def _after_key(data: bytes, key: str) -> int:
    """Offset of the value type that follows a key's bytes."""
    return data.index(key.encode()) + len(key)


MALFORMED = ("empty", "truncated-in-header", "truncated-in-kv", "truncated-in-tokens", "truncated-in-tensor-infos",
             "truncated-in-data", "truncated-last-byte", "bad-magic", "bad-version", "absurd-tensor-count",
             "absurd-kv-count", "absurd-string-array", "absurd-int-array", "absurd-string-length",
             "unknown-value-type")


def _malformed(good: bytes, data_offset: int) -> dict:
    """case -> (file bytes, expected words in the error), derived from a good file."""
    tokens = _after_key(good, "tokenizer.ggml.tokens")
    types = _after_key(good, "tokenizer.ggml.token_type")
    return {
        "empty": (b"", "too short for a GGUF header"),
        "truncated-in-header": (good[:20], "too short"),
        "truncated-in-kv": (good[:200], "truncated"),
        "truncated-in-tokens": (good[: tokens + 2000], "truncated"),
        "truncated-in-tensor-infos": (good[: data_offset - 40], "truncated"),
        "truncated-in-data": (good[: data_offset + 5000], "extends past the end of the file"),
        "truncated-last-byte": (good[:-1], "extends past the end of the file"),
        "bad-magic": (b"GGML" + good[4:], "bad magic"),
        "bad-version": (_patch(good, 4, "<I", 7), "GGUF version 7 is not supported"),
        "absurd-tensor-count": (_patch(good, 8, "<Q", 1 << 62), "more than"),
        "absurd-kv-count": (_patch(good, 16, "<Q", (1 << 64) - 1), "more than"),
        "absurd-string-array": (_patch(good, tokens + 8, "<Q", 1 << 60), "strings of array 'tokenizer.ggml.tokens'"),
        "absurd-int-array": (_patch(good, types + 8, "<Q", 1 << 61), "items of array 'tokenizer.ggml.token_type'"),
        "absurd-string-length": (_patch(good, good.index(b"general.architecture") - 8, "<Q", 1 << 50), "truncated"),
        "unknown-value-type": (_patch(good, _after_key(good, "general.file_type"), "<I", 99), "unknown value type 99"),
    }


@pytest.fixture(scope="module")
def malformed(exported, tmp_path_factory):
    _, path = exported["arcee"]
    good = path.read_bytes()
    root = tmp_path_factory.mktemp("bad")
    cases = {}
    built = _malformed(good, check_gguf_file(path).data_offset)
    assert set(built) == set(MALFORMED)
    for name, (data, needle) in built.items():
        (root / f"{name}.gguf").write_bytes(data)
        cases[name] = root / f"{name}.gguf", needle
    return cases


def _assert_one_line_error(capsys, argv, needle):
    t = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sparseflash: error:"), err
    assert needle in err[0], err[0]
    assert elapsed < 10, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_gguf_gives_one_line_error(malformed, capsys, case):
    path, needle = malformed[case]
    _assert_one_line_error(capsys, ["info", "-m", str(path)], needle)


@pytest.mark.parametrize("key, value, vtype, needle", [
    ("arcee.block_count", "two", "STRING", "'arcee.block_count' has type STRING, expected an integer"),
    ("arcee.attention.head_count", 0, "UINT32", "'arcee.attention.head_count' is 0"),
    ("arcee.attention.layer_norm_rms_epsilon", 5, "UINT32", "expected a float"),
    ("arcee.block_count", 1 << 40, "UINT64", "exceeds the 19 tensors"),
    ("arcee.embedding_length", 48, "UINT32", "has shape"),
])
def test_wrong_metadata_gives_one_line_error(exported, tmp_path, capsys, key, value, vtype, needle):
    from gguf import GGUFValueType

    _, path = exported["arcee"]
    bad = _rewrite_gguf(path, tmp_path / "bad.gguf", set_kv={key: (value, GGUFValueType[vtype])})
    _assert_one_line_error(capsys, ["info", "-m", str(bad)], needle)


def test_missing_tensor_is_named_as_in_the_gguf(exported, tmp_path, capsys):
    _, path = exported["arcee"]
    bad = _rewrite_gguf(path, tmp_path / "bad.gguf", drop={"blk.1.ffn_down.weight"})
    _assert_one_line_error(capsys, ["info", "-m", str(bad)], "tensor 'blk.1.ffn_down.weight' is missing")


def test_unknown_architecture(exported, tmp_path, capsys):
    _, path = exported["arcee"]
    arch_value = struct.pack("<Q", 5) + b"arcee"  # general.architecture is the first key written
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes().replace(arch_value, struct.pack("<Q", 5) + b"gpt2x", 1))
    _assert_one_line_error(capsys, ["info", "-m", str(bad)], "GGUF architecture 'gpt2x' is not supported")


def test_missing_gguf_file(tmp_path, capsys):
    _assert_one_line_error(capsys, ["run", "-m", str(tmp_path / "nope.gguf")], "no such GGUF file")


# --- llama.cpp ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def llama_cpp_logits(llama_cpp, path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits (tokens, vocab) for one sequence, f32 KV cache."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_llama_cpp_gives_sparseflash_logits(llama_cpp, exported, family):
    _, path = exported[family]
    tokens = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    theirs = llama_cpp_logits(llama_cpp, path, tokens)
    model = open_dense(path)
    ours = model.transformer()(torch.tensor([tokens]))[0].numpy()
    diff = float(np.abs(theirs - ours).max())
    assert diff <= 1e-3, f"{family}: max |logit diff| vs llama.cpp {diff}"


def test_llama_cpp_runs_the_bundled_model(llama_cpp, tmp_path):
    path = export_gguf(default_model_dir(), tmp_path / "tiny-relu2.gguf").path
    model = open_dense(path)
    tokens = model.tokenizer.encode(SAMPLE_TEXT * 3)[:100]
    theirs = llama_cpp_logits(llama_cpp, path, tokens)
    ours = model.transformer()(torch.tensor([tokens]))[0].numpy()
    assert float(np.abs(theirs - ours).max()) <= 1e-3


def test_llama_cpp_tokenizes_like_sparseflash(llama_cpp, tmp_path):
    path = export_gguf(default_model_dir(), tmp_path / "tiny-relu2.gguf").path
    ours = open_dense(path).tokenizer
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (SAMPLE_TEXT, "  leading spaces, ünïcödé and <|endoftext|> in the middle", "it's 1234567 o'clock!!\n\n"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text)
    llm.close()
