"""The whole chain on the bundled trained model: prepare, layout quality, io-report, streamed run."""

import json

import numpy as np
import pytest

from sparseflash.layout.format import LayoutFile
from sparseflash.layout.pipeline import PrepareParams, bundled_texts, prepare
from sparseflash.model.loader import open_dense
from sparseflash.model.text import corpus_ids
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.tools.cli import main

SMALL = PrepareParams(profile_tokens=8192, cett_tokens=4096, heldout_tokens=1024, predictor_tokens=8192,
                      rank=24, epochs=8, hot_fraction=0.1)
DEVICE = DeviceModel(latency_s=80e-6, bandwidth_bps=1e9, source="test")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    calib, held = bundled_texts()
    logs = []
    path = prepare(None, calib, held, out, SMALL, quiet=True, log=logs.append)
    return out, path, logs


@pytest.fixture(scope="module")
def heldout_ids():
    _, held = bundled_texts()
    return corpus_ids(held, open_dense(None).tokenizer, 20000)[8192:]  # not the PPL-search tokens


def test_prepare_writes_everything_once(prepared):
    out, path, logs = prepared
    assert len(logs) == 3 and path.exists()
    assert (out / "profile" / "profile.json").exists() and (out / "predictors" / "predictors.json").exists()
    again = []
    calib, held = bundled_texts()
    assert prepare(None, calib, held, out, SMALL, quiet=True, log=again.append) == path
    assert again == []  # cached
    with LayoutFile.open(path, verify=True) as f:
        layer = f.layers[0]
        assert layer.n_hot == 102 and f.header["predictors"] is not None


def test_layout_round_trip_gives_checkpoint_weights(prepared):
    _, path, _ = prepared
    model = open_dense(None)
    with LayoutFile.open(path) as f:
        for l in (0, 5):
            perm = f.permutation(l)
            rows = f.read_bundles(l, start=0, count=f.layers[l].n_neurons).astype(np.float32)
            w = model.weights.layers[l]
            up = w.w_up.numpy()[perm].astype(np.float16).astype(np.float32)
            down = w.w_down.numpy()[:, perm].T.astype(np.float16).astype(np.float32)
            assert np.array_equal(rows[:, :256], up) and np.array_equal(rows[:, 256:], down)


def test_coact_layout_halves_requests_on_heldout_tokens(prepared, heldout_ids):
    from sparseflash.runtime.layout_report import layout_report

    _, path, _ = prepared
    r = layout_report(str(path), heldout_ids, tokens=2048, device=DEVICE, quiet=True)
    assert r["requests_per_token"] <= 0.5 * r["identity"]["requests_per_token"]
    assert r["bytes_per_token"] <= r["identity"]["bytes_per_token"]


def test_io_report_orders_the_modes(prepared, heldout_ids):
    from sparseflash.runtime.io_report import io_report

    _, path, _ = prepared
    r = io_report([str(path)], heldout_ids, tokens=256, ctx=128, budget="30%ffn", device=DEVICE, quiet=True)
    modes = r["modes"]
    for key in ("bytes_per_token", "dense_share", "requests_per_token", "bytes_per_request", "hit_rate",
                "io_ms_per_token", "ppl", "top1_agreement"):
        assert all(key in modes[m] for m in ("dense-stream", "sparse", "sparse+window", "oracle"))
    assert modes["dense-stream"]["dense_share"] == pytest.approx(1.0)
    fetched = {m: modes[m]["neurons_fetched_per_token"] for m in ("sparse", "sparse+window", "oracle")}
    assert fetched["oracle"] <= fetched["sparse+window"] <= fetched["sparse"]
    assert modes["sparse+window"]["hit_rate"] > modes["sparse"]["hit_rate"]
    assert modes["sparse"]["ppl"] == pytest.approx(modes["sparse+window"]["ppl"], rel=1e-4)
    sweep = r["layouts"][0]["sweep"]["by_budget"]
    for curve in (sweep["lru"], sweep["oracle"]):  # a bigger cache never reads more
        assert all(b <= a + 1e-9 for a, b in zip(curve, curve[1:]))
    ev = r["layouts"][0]["eviction"]
    assert set(ev) == {"lru", "lfu", "predicted", "window", "belady"}
    floor = ev["belady"]["neurons_fetched_per_token"]
    for policy in ("lru", "lfu", "predicted", "window"):  # same predicted sets, same cache: Belady is the floor
        assert ev[policy]["neurons_fetched_per_token"] >= floor - 1e-9
    from sparseflash.runtime.policy import DEFAULT_EVICTION

    assert ev[DEFAULT_EVICTION]["neurons_fetched_per_token"] == pytest.approx(fetched["sparse+window"])


def test_streamed_run_on_the_prepared_layout(prepared, capsys):
    _, path, _ = prepared
    code = main(["run", "-m", str(path), "--budget", "30%ffn", "-p", "The os module", "-n", "12", "--greedy",
                 "--ignore-eos", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and len(r["tokens"]) == 12
    assert 0 < r["decode_dense_share"] < 1 and r["strategy"] in ("topk", "threshold")
    mp = r["memory_plan"]
    assert mp["hot"] + mp["cache"] <= 0.3 * 6 * 1024 * 1024 * 1.01
