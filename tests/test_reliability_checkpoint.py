"""Checkpoints and GGUF files that lie are refused in one line (exit 2) before a token is produced: a
config whose layer count, RoPE variant or epsilon cannot be right, a GGUF tensor relabelled to another
type, NaN weights or epsilon that would print "perplexity nan"."""

import json
import math
import shutil

import numpy as np
import pytest
from cli_run import assert_one_line_error, run_cli
from tiny_models import EVAL_CORPUS, TINY_RELU2

RUN = ("run", "-p", "The os module", "-n", "2", "--greedy", "--json")
PPL = ("eval-ppl", "--text", EVAL_CORPUS, "--tokens", "256", "--ctx", "64", "--json")


def _copy(tmp_path, config_edit=None):
    dest = tmp_path / "ckpt"
    shutil.copytree(TINY_RELU2, dest, ignore=shutil.ignore_patterns("*.txt.zst", "README.md"))
    if config_edit is not None:
        cfg = json.loads((dest / "config.json").read_text())
        config_edit(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _yarn_without_original(cfg):
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}


CONFIG_LIES = {  # case: (config edit, text the one line must hold); the bundled model stores 6 layers
    "num_hidden_layers 0": (lambda c: c.update(num_hidden_layers=0), "num_layers must be a positive integer"),
    "num_hidden_layers 3 of 6 stored": (lambda c: c.update(num_hidden_layers=3), "layer"),
    "num_hidden_layers 8 of 6 stored": (lambda c: c.update(num_hidden_layers=8), "layer"),
    "yarn without original_max_position_embeddings": (_yarn_without_original, "original_max_position_embeddings"),
    "norm_eps nan": (lambda c: c.update(norm_eps=math.nan), "norm_eps"),
    "norm_eps inf": (lambda c: c.update(norm_eps=math.inf), "norm_eps"),
    "rope_theta nan": (lambda c: c["rope_parameters"].update(rope_theta=math.nan), "rope_theta"),
}


@pytest.mark.parametrize("lie", list(CONFIG_LIES.values()), ids=list(CONFIG_LIES))
def test_a_config_that_lies_is_one_line(lie, tmp_path):
    edit, text = lie
    ckpt = _copy(tmp_path, edit)
    for argv in (RUN, PPL):
        code, out, err = run_cli(*argv, "-m", ckpt, timeout=120)
        assert_one_line_error(code, err, text)
        assert out == ""


@pytest.fixture(scope="module")
def gguf_f32(tmp_path_factory):
    from sparseflash.model.gguf_export import export_gguf

    path = export_gguf(TINY_RELU2, tmp_path_factory.mktemp("gguf") / "clean.gguf", "f32").path
    code, _, err = run_cli(*RUN, "-m", path)
    assert code == 0, err
    return path


def _edited(gguf_f32, tmp_path, edit):
    """A copy of the GGUF edited in place through gguf-py's writable map: ``edit(reader)``."""
    from gguf import GGUFReader

    path = tmp_path / "edited.gguf"
    shutil.copy(gguf_f32, path)
    reader = GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return path


def _tensor(reader, name):
    (t,) = [t for t in reader.tensors if t.name == name]
    return t


def _relabel_f16(name):
    def edit(reader):  # tensor info parts: name length, name, n_dims, dims, type, offset
        _tensor(reader, name).field.parts[-2][0] = 1  # GGMLQuantizationType.F16
    return edit


def _kv(key, value):
    def edit(reader):
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    return edit


def _poison(name):
    def edit(reader):
        _tensor(reader, name).data.reshape(-1)[3] = np.nan
    return edit


GGUF_LIES = {  # case: (edit, text the one line must hold)
    "token_embd relabelled F32 -> F16": (_relabel_f16("token_embd.weight"), "token_embd.weight"),
    "blk.0.ffn_up relabelled F32 -> F16": (_relabel_f16("blk.0.ffn_up.weight"), "blk.0.ffn_up.weight"),
    "block_count 0": (_kv("nemotron.block_count", 0), "block_count"),
    "block_count 3 of 6 stored": (_kv("nemotron.block_count", 3), "blk.3"),
    "layer_norm_epsilon nan": (_kv("nemotron.attention.layer_norm_epsilon", math.nan), "norm_eps"),
    "a NaN weight in blk.0.ffn_up": (_poison("blk.0.ffn_up.weight"), "non-finite"),
}


@pytest.mark.parametrize("case", list(GGUF_LIES))
def test_a_gguf_that_lies_is_one_line(case, gguf_f32, tmp_path):
    edit, text = GGUF_LIES[case]
    bad = _edited(gguf_f32, tmp_path, edit)
    for argv in (RUN, PPL):
        code, out, err = run_cli(*argv, "-m", bad, timeout=120)
        assert_one_line_error(code, err, text)
        assert out == ""
