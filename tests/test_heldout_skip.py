"""io-report leaves out the held-out tokens the layout's quality gate chose its cuts on: prepare records the
held-out text's hash in the gate, and on that text io-report starts after the gate's tokens unless told
otherwise (--skip N); on another text it starts at the beginning."""

import json

import pytest
from layouts import tiny_layout
from test_cost_aware import _miss_gate
from test_predicted_sets import _predictors
from test_quality_gate import PROFILE, _report

from sparseflash.errors import SparseflashError
from sparseflash.eval.heldout import eval_ids, gate_tokens
from sparseflash.layout.quality_gate import decide_gate
from sparseflash.model.checkpoint import file_hash
from sparseflash.model.text import corpus_ids
from sparseflash.runtime.layout_model import open_layout
from sparseflash.tools.cli import main


class Chars:
    """A tokenizer of one id per character (the ids a text gives are then known by hand)."""

    def encode(self, text):
        return [ord(c) for c in text]


def _texts(tmp_path):
    gated, other = tmp_path / "heldout.txt", tmp_path / "other.txt"
    gated.write_text("".join(chr(65 + i % 26) for i in range(400)))
    other.write_text("".join(chr(97 + i % 26) for i in range(400)))
    return gated, other


def test_the_gate_records_the_heldout_text_it_validated_on():
    assert decide_gate(_report(), PROFILE, 1.0, 0.5, heldout_hash="0123abcd")["heldout_hash"] == "0123abcd"
    assert "heldout_hash" not in decide_gate(_report(), PROFILE, 1.0, 0.5)


def test_the_gate_tokens_are_left_out_on_its_own_text_only(tmp_path):
    gated, other = _texts(tmp_path)
    gate = {"heldout_tokens": 100, "heldout_hash": file_hash(gated)}
    ids, skipped, note = eval_ids(gated, Chars(), 50, 10, None, gate)
    assert skipped == 100 and ids == corpus_ids(gated, Chars(), 150)[100:150] and ids[0] == ord("W")
    assert "first 100 tokens" in note and "--skip 0" in note
    assert eval_ids(other, Chars(), 50, 10, None, gate)[1:] == (0, None)  # another text: from its start
    assert eval_ids(gated, Chars(), 50, 10, None, {"heldout_tokens": 100})[1] == 0  # no hash recorded
    assert eval_ids(gated, Chars(), 50, 10, None, None)[1] == 0  # no gate
    ids, skipped, note = eval_ids(gated, Chars(), 50, 10, 0, gate)  # --skip 0: the gate's tokens kept
    assert (skipped, note, ids[0]) == (0, None, ord("A"))
    ids, skipped, _ = eval_ids(other, Chars(), 50, 10, 7, gate)  # --skip N on any text
    assert skipped == 7 and ids[0] == ord("h") and len(ids) == 50
    assert gate_tokens(gate, gated) == 100 and gate_tokens(gate, other) == 0


def test_a_skip_that_leaves_less_than_one_window_is_one_clear_error(tmp_path):
    gated, _ = _texts(tmp_path)
    with pytest.raises(SparseflashError, match="fewer than one window of 64 remain.*--skip 0"):
        eval_ids(gated, Chars(), 50, 64, None, {"heldout_tokens": 390, "heldout_hash": file_hash(gated)})
    with pytest.raises(SparseflashError, match="--skip must be >= 0"):
        eval_ids(gated, Chars(), 50, 10, -1, None)


def test_io_report_starts_after_the_gate_tokens_and_says_so(tmp_path, capsys):
    gated, other = _texts(tmp_path)
    gate = {**_miss_gate(), "heldout_tokens": 96, "heldout_hash": file_hash(gated)}
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", preds=_predictors(2), n_hot=8, gate=gate)
    lm = open_layout(path)
    assert lm.header.predictors.gate["heldout_hash"] == file_hash(gated)  # read back through the schema
    lm.close()
    base = ["io-report", "-m", str(path), "--tokens", "64", "--ctx", "32", "--no-eviction", "--json"]
    for corpus, extra, skipped, noted in ((gated, [], 96, True), (gated, ["--skip", "0"], 0, False),
                                         (other, [], 0, False), (other, ["--skip", "5"], 5, False)):
        assert main([*base, "--corpus", str(corpus), *extra]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["skipped_tokens"] == skipped
        assert ("leaving out the first 96 tokens" in err) == noted
    assert main([*base, "--corpus", str(gated), "--skip", "-3"]) != 0
    assert "--skip must be >= 0" in capsys.readouterr().err
