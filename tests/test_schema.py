"""The model contract on top of the container: one definition of names, bundles and "active", and a
layout whose header or tensors lie is refused in one line, naming the field and what to rerun."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import tiny_layout
from test_layout_format_samples import header_bytes_of, index_of, reassemble

from sparseflash.errors import ArtefactError
from sparseflash.kernels import pack_bundles
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutFile
from sparseflash.runtime.layout_model import open_layout
from sparseflash.tools.cli import main


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("gated", [False, True])
def test_bundle_bytes_are_what_the_kernels_pack(dtype, gated):
    d, n = 24, 5
    rng = np.random.default_rng(0)
    gate = rng.standard_normal((n, d)) if gated else None
    rows = pack_bundles(rng.standard_normal((n, d)), rng.standard_normal((d, n)), gate, dtype=dtype)
    assert rows[0].nbytes == schema.bundle_bytes(d, gated, dtype)
    assert rows.shape[1] == schema.bundle_len(d, gated) and len(schema.bundle_parts(gated)) == rows.shape[1] // d


def test_active_means_above_threshold_and_not_zero_for_numpy_and_torch():
    mag = [0.0, 0.0, 0.5, 1.0, 2.0]
    for thr, expect in ((0.0, [0, 0, 1, 1, 1]), (1.0, [0, 0, 0, 1, 1])):
        assert schema.active_mask(np.array(mag), thr).astype(int).tolist() == expect
        assert schema.active_mask(torch.tensor(mag), thr).int().tolist() == expect
    assert schema.neuron_magnitude(torch.tensor([-2.0, 3.0]), torch.tensor([0.5, 2.0])).tolist() == [1.0, 6.0]


def test_bf16_storage_round_trips_and_rounds_to_nearest_even():
    x = torch.tensor([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38])
    stored = schema.to_storage(x, "bf16")
    assert stored.dtype == np.uint16
    back = schema.to_float32(stored, "bf16")
    assert back.tolist()[:4] == [1.0, -2.5, 1.0, 1 + 2**-6]  # ties to even: 1+2^-8 -> 1, 1+3*2^-8 -> 1+2^-6
    assert np.array_equal(back, x.to(torch.bfloat16).float().numpy())


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    from sparseflash.layout.predictor import Predictor

    tmp = tmp_path_factory.mktemp("schema")
    g = torch.Generator().manual_seed(0)
    preds = {f"layer.{l}": Predictor(torch.randn(4, 64, generator=g), torch.zeros(4), torch.randn(160, 4, generator=g),
                                     torch.zeros(160), topk=8, cut=1.0) for l in range(2)}
    preds["lookahead.1"] = preds["layer.1"]
    _, path = tiny_layout(tmp, "llama-silu", dtype="f16", n_hot=8, preds=preds, strategy="topk")
    return path


def test_header_written_is_the_header_read(layout):
    with LayoutFile.open(layout) as f:
        header = schema.read_header(layout, f.header)
        schema.check_layout(layout, header, f.tensors, f.layers)
    assert header.to_json() == json.loads(json.dumps(header.to_json()))
    assert header.predictors.strategy == "topk" and header.predictors.lookahead[0] is None
    assert [p.rank for p in header.predictors.layers] == [4, 4]
    assert set(schema.expected_tensors(header)) >= {"embed", "layers.1.perm", "pred.lookahead.1.w2", "layers.0.bq"}


def _with_header(path: Path, out: Path, edit) -> Path:
    blob = path.read_bytes()
    header = json.loads(header_bytes_of(blob))
    edit(header)
    out.write_bytes(reassemble(blob, header=json.dumps(header).encode()))
    return out


def _set(path: str, value):
    def edit(header):
        *parents, key = path.split(".")
        node = header
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


def _gate(**change):
    """A gate record as prepare writes it (quality_gate.decide_gate), with fields changed or removed."""
    from sparseflash.layout.quality_gate import decide_gate

    report = {"ppl": {"dense": 20.0, "predicted_topk": 20.1, "predicted_threshold": 20.5}, "strategy": "topk",
              "mean": {"sparsity_topk": 0.9, "sparsity_threshold": 0.8}, "val_tokens": 1024}
    gate = decide_gate(report, {"ppl_p": 1.0, "ppl_p_sparsity": 0.9}, 1.0, 0.5)
    for key, value in change.items():
        if value is None:
            gate.pop(key)
        else:
            gate[key] = value
    return _set("predictors.gate", gate)


def test_a_gate_record_is_read_and_sets_the_default_strategy(layout, tmp_path):
    good = _with_header(layout, tmp_path / "gated.sflash", _gate(strategy="threshold"))
    with LayoutFile.open(good) as f:
        header = schema.read_header(good, f.header)
    assert header.predictors.gate["strategy"] == "threshold" and header.predictors.default_strategy == "threshold"


def test_a_miss_cut_is_read_back(layout, tmp_path):
    good = _with_header(layout, tmp_path / "miss.sflash",
                        _set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5}] * 2))
    with LayoutFile.open(good) as f:
        header = schema.read_header(good, f.header)
    assert [p.miss_cut for p in header.predictors.layers] == [2.5, 2.5]
    assert header.predictors.lookahead[1].miss_cut is None  # optional: absent where none was validated
    assert header.predictors.to_json()["layers"][0]["miss_cut"] == 2.5
    assert header.predictors.layers[0].cached_cut is None  # optional too


def test_a_cached_cut_is_read_back(layout, tmp_path):
    good = _with_header(layout, tmp_path / "cached.sflash", _set(
        "predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5, "cached_cut": -0.5}] * 2))
    with LayoutFile.open(good) as f:
        header = schema.read_header(good, f.header)
    assert [p.cached_cut for p in header.predictors.layers] == [-0.5, -0.5]
    assert header.predictors.to_json()["layers"][0]["cached_cut"] == -0.5


def test_larger_miss_cuts_are_read_back(layout, tmp_path):
    good = _with_header(layout, tmp_path / "larger.sflash", _set("predictors.layers", [
        {"topk": 8, "cut": 1.0, "rank": 4, "cached_cut": 0.5, "larger_miss_cuts": [[0.5, 3.0], [0.75, 4.0]]}] * 2))
    with LayoutFile.open(good) as f:
        header = schema.read_header(good, f.header)
    assert header.predictors.layers[0].larger_miss_cuts == ((0.5, 3.0), (0.75, 4.0))
    assert header.predictors.layers[0].miss_cut is None  # no cut held the bound with the smallest cache
    assert header.predictors.to_json()["layers"][0]["larger_miss_cuts"] == [[0.5, 3.0], [0.75, 4.0]]


LYING_HEADERS = {  # case: (edit, text the one-line error must contain)
    "model is a list": (_set("model", [1, 2]), "header.model"),
    "model is a string": (_set("model", "llama"), "header.model"),
    "model is null": (_set("model", None), "header.model"),
    "no schema version": (lambda h: h.pop("schema_version"), "schema_version"),
    "schema version from the future": (_set("schema_version", 99), "schema_version"),
    "not a model layout": (_set("kind", "something-else"), "header.kind"),
    "unknown key": (_set("extra", 1), "unknown key"),
    "missing tokenizer": (lambda h: h.pop("tokenizer_json"), "tokenizer_json"),
    "hidden size disagrees with the tensors": (_set("model.hidden_size", 32), "must be"),
    "more layers than regions": (_set("model.num_layers", 3), "layers"),
    "fewer layers than regions": (_set("model.num_layers", 1), "layers"),
    "heads disagree with wq": (_set("model.num_heads", 8), "must be"),
    "infinite norm_eps": (_set("model.norm_eps", 1e999), "header"),
    "negative rope theta": (_set("model.rope_theta", -1.0), "rope_theta"),
    "unknown activation": (_set("model.activation", "swish9"), "activation"),
    "unknown arch": (_set("model.arch", "gpt99"), "arch"),
    "unknown norm": (_set("model.norm", "batchnorm"), "norm"),
    "bundle_bytes lies": (_set("bundle_bytes", 999), "bundle_bytes"),
    "dtype lies": (_set("dtype", "bf16"), "dtype"),
    "hot count lies": (_set("n_hot", 9), "n_hot"),
    "predictor rank lies": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 5}] * 2), "pred.layer.0.w1"),
    "predictor top-k 0": (_set("predictors.layers", [{"topk": 0, "cut": 1.0, "rank": 4}] * 2), "topk"),
    "too few predictor entries": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4}]), "predictors.layers"),
    "predictor strategy unknown": (_set("predictors.strategy", "magic"), "strategy"),
    "look-ahead for layer 0": (_set("predictors.lookahead", [{"topk": 8, "cut": 1.0, "rank": 4}, None]), "lookahead[0]"),
    "gate strategy unknown": (_gate(strategy="magic"), "gate.strategy"),
    "gate without its bound": (_gate(max_rise_pct=None), "gate.max_rise_pct"),
    "gate fallback not a bool": (_gate(fallback="no"), "gate.fallback"),
    "gate without the chosen rise": (_gate(rise_pct={"threshold": 2.5}), "gate.rise_pct.topk"),
    "gate rise not a number": (_gate(rise_pct={"topk": "small"}), "gate.rise_pct.topk"),
    "gate dense ppl zero": (_gate(ppl_dense=0), "gate.ppl_dense"),
    "gate held-out hash not a string": (_gate(heldout_hash=7), "gate.heldout_hash"),
    "miss cut not a number": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": "x"}] * 2),
                              "layers[0].miss_cut"),
    "cached cut above the cut": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5,
                                                              "cached_cut": 1.5}] * 2), "layers[0].cached_cut"),
    "cached cut without a miss cut": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4,
                                                                  "cached_cut": 0.5}] * 2), "layers[0].cached_cut"),
    "cached cut not a number": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5,
                                                            "cached_cut": [0]}] * 2), "layers[0].cached_cut"),
    "gate miss recall without its rise": (_gate(miss_recalls=[0.9], miss_rise_pct={"0.8": 0.5}, miss_recall=0.9),
                                          "gate.miss_rise_pct"),
    "gate miss recalls not a list": (_gate(miss_recalls=0.9), "gate.miss_recalls"),
    "gate cached share above one": (_gate(cached_share=1.5), "gate.cached_share"),
    "gate larger share not a list": (_gate(miss_larger={"share": 0.5}), "gate.miss_larger"),
    "gate larger share out of range": (_gate(miss_larger=[{"share": 2.0, "miss_rise_pct": {}, "miss_recall": None}]),
                                       "miss_larger[0].share"),
    "gate larger recall without its rise": (_gate(miss_larger=[{"share": 0.5, "miss_rise_pct": {"0.9": 0.5},
                                                                 "miss_recall": 0.8}]), "miss_larger[0]"),
    "larger miss cuts not pairs": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5,
                                                               "larger_miss_cuts": [0.5]}] * 2), "larger_miss_cuts"),
    "larger miss cuts descending": (_set("predictors.layers", [{"topk": 8, "cut": 1.0, "rank": 4, "miss_cut": 2.5,
                                                                "larger_miss_cuts": [[0.75, 3], [0.5, 2]]}] * 2),
                                    "larger_miss_cuts"),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_a_lying_header_is_one_line_naming_the_field(layout, tmp_path, case, capsys):
    edit, text = LYING_HEADERS[case]
    bad = _with_header(layout, tmp_path / "bad.sflash", edit)
    with pytest.raises(ArtefactError) as caught:
        open_layout(bad)
    message = str(caught.value)
    assert text in message and str(bad) in message and "\n" not in message
    capsys.readouterr()
    code = main(["run", "-m", str(bad), "--budget", "200%", "-n", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err


def test_a_tensor_of_the_wrong_shape_or_missing_is_refused(layout, tmp_path):
    blob = layout.read_bytes()
    index = index_of(blob)
    (entry,) = [t for t in index["tensors"] if t["name"] == "layers.0.wk"]
    entry["name"] = "layers.0.wk_renamed"
    missing = tmp_path / "missing.sflash"
    missing.write_bytes(reassemble(blob, index=index))
    with pytest.raises(ArtefactError, match=r"tensor 'layers.0.wk': is missing; rebuild it with `sparseflash prepare`"):
        open_layout(missing)


def test_inspect_reports_a_broken_contract_and_exits_2(layout, tmp_path, capsys):
    bad = _with_header(layout, tmp_path / "bad.sflash", _set("n_hot", 9))
    assert main(["inspect", str(bad)]) == 2
    out = capsys.readouterr()
    assert "n_hot" in out.err and len(out.err.strip().splitlines()) == 1
    assert main(["inspect", str(layout)]) == 0
