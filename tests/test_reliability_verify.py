"""One flipped byte in each region of a layout: `inspect --verify` exits 2 and lists the failure, and
`run` never gives other tokens with exit 0; bundles rewritten during a run and an index that lies
(duplicate keys, a dtype that is not the stored one) are refused in one line."""

import json
import os

import numpy as np
import pytest
import torch
from cli_run import assert_one_line_error, run_cli
from layouts import tiny_layout
from test_layout_format_samples import index_of, preamble_of, reassemble
from tiny_models import BUNDLED_TOKENIZER

from sparseflash.layout.predictor import Predictor
from sparseflash.model.tokenizer import TextTokenizer

RUN = ("run", "-p", "The os module", "-n", "6", "--greedy", "--json", "--budget", "25%ffn", "--strategy", "all")
PROMPT_ID = TextTokenizer.from_file(BUNDLED_TOKENIZER).encode("The os module")[0]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    g = torch.Generator().manual_seed(0)
    # b1 > 0: a larger b1 moves every predictor score, so a flipped b1 picks other neurons (predictor case)
    preds = {f"layer.{l}": Predictor(torch.randn(4, 64, generator=g), torch.rand(4, generator=g) + 0.5,
                                     torch.randn(160, 4, generator=g), torch.zeros(160), topk=40, cut=1.0)
             for l in range(2)}
    path = tiny_layout(tmp, "nemotron", dtype="f16", n_hot=8, preds=preds, strategy="topk")[1]
    tokens = {}
    for strategy in ("all", "topk"):  # topk: the predictors choose the neurons
        code, out, err = run_cli(*RUN[:-1], strategy, "-m", path)
        assert code == 0, err
        tokens[strategy] = json.loads(out)["tokens"]
    return path, tokens


def region_offsets(blob: bytes) -> dict[str, int]:
    """One byte offset inside each region: the top byte of a weight where the region holds weights."""
    p, index = preamble_of(blob), index_of(blob)
    tensors = {t["name"]: t for t in index["tensors"]}
    layer = index["layers"][1]

    def top_byte(offset, width=2):  # little-endian: the last byte of an element holds its exponent
        return offset + width - 1
    return {
        "preamble": 40, "header": p.header_offset + p.header_length // 2, "index": p.index_offset + 30,
        "embedding": top_byte(tensors["embed"]["offset"] + 2 * 64 * PROMPT_ID),  # a row the prompt uses
        "attention": top_byte(tensors["layers.0.wq"]["offset"] + 2 * 100),
        "norm": top_byte(tensors["layers.1.ffn_norm_w"]["offset"] + 4 * 3, 4),
        "permutation": tensors["layers.0.perm"]["offset"] + 1,
        "predictor": top_byte(tensors["pred.layer.0.b1"]["offset"] + 4 * 2, 4),
        "hot bundle": top_byte(layer["offset"] + 3 * layer["bundle_bytes"] + 2 * 5),
        "cold bundle": top_byte(layer["offset"] + 100 * layer["bundle_bytes"] + 2 * 5),
    }


REGIONS = ["preamble", "header", "index", "embedding", "attention", "norm", "permutation", "predictor", "hot bundle",
           "cold bundle"]


def _flipped(path, region, tmp_path):
    blob = bytearray(path.read_bytes())
    blob[region_offsets(bytes(blob))[region]] ^= 0x40
    bad = tmp_path / "flipped.sflash"
    bad.write_bytes(bytes(blob))
    return bad


@pytest.mark.parametrize("region", REGIONS)
def test_inspect_verify_exits_2_and_lists_the_failure(layout, region, tmp_path):
    bad = _flipped(layout[0], region, tmp_path)
    code, out, err = run_cli("inspect", bad, "--verify")
    line = assert_one_line_error(code, err, str(bad))
    if region not in ("preamble", "header", "index"):  # those fail at open, before any summary
        if region == "permutation":  # every permutation is checked at open
            assert "not a permutation" in line
        else:
            assert "checksum failure" in line and "crc32" in line
            assert "checksums: FAILED (1 regions)" in out


@pytest.mark.parametrize("region", REGIONS)
def test_run_on_a_flipped_byte_is_exit_2_or_the_same_tokens(layout, region, tmp_path):
    bad = _flipped(layout[0], region, tmp_path)
    strategy = "topk" if region == "predictor" else "all"
    code, out, err = run_cli(*RUN[:-1], strategy, "-m", bad)
    if code == 0:
        assert json.loads(out)["tokens"] == layout[1][strategy], "silent wrong answer"
    else:
        assert_one_line_error(code, err, str(bad))


def test_bundles_overwritten_while_run_generates_are_caught(layout, tmp_path, monkeypatch):
    import sparseflash.runtime.session as session

    bad = tmp_path / "live.sflash"
    bad.write_bytes(layout[0].read_bytes())
    region = index_of(bad.read_bytes())["layers"][1]
    real = session.open_streamed

    def open_then_overwrite(path, *a, **k):
        model = real(path, *a, **k)
        fd = os.open(path, os.O_RDWR)
        start = region["offset"] + region["n_hot"] * region["bundle_bytes"]
        data = np.frombuffer(os.pread(fd, region["length"], start), np.uint8).copy()
        data[1::14] ^= 0x40
        os.pwrite(fd, data.tobytes(), start)
        os.close(fd)
        return model
    monkeypatch.setattr(session, "open_streamed", open_then_overwrite)
    code, out, err = run_cli(*RUN, "-m", bad)
    assert code == 2 or json.loads(out)["tokens"] == layout[1]["all"], "silent wrong answer"


def _index_text_edit(path, tmp_path, old: str, new: str):
    blob = path.read_bytes()
    p = preamble_of(blob)
    text = json.dumps(json.loads(blob[p.index_offset: p.index_offset + p.index_length]), separators=(",", ":"))
    assert old in text
    bad = tmp_path / "index.sflash"
    bad.write_bytes(reassemble(blob, index=text.replace(old, new, 1).encode()))
    return bad


def test_duplicate_keys_in_the_index_are_refused(layout, tmp_path):
    bad = _index_text_edit(layout[0], tmp_path, '"name":"layers.0.wq","dtype":"f16"',
                           '"name":"layers.0.wq","dtype":"f16","dtype":"bf16"')
    code, _, err = run_cli(*RUN, "-m", bad)
    assert_one_line_error(code, err, str(bad))


def test_an_index_dtype_that_lies_is_refused(layout, tmp_path):
    bad = _index_text_edit(layout[0], tmp_path, '"name":"layers.0.wq","dtype":"f16"', '"name":"layers.0.wq","dtype":"bf16"')
    code, _, err = run_cli(*RUN, "-m", bad)
    assert_one_line_error(code, err, "layers.0.wq")


def test_an_embedding_read_as_u16_is_refused(layout, tmp_path):
    bad = _index_text_edit(layout[0], tmp_path, '"name":"embed","dtype":"f16"', '"name":"embed","dtype":"u16"')
    code, _, err = run_cli(*RUN, "-m", bad)
    assert_one_line_error(code, err, "embed")
