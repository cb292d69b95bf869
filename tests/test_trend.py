"""`sparseflash sparsity-trend` on a tiny series trained by bench/train_series.py --quick."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseflash.eval.trend import TrendParams, measure_checkpoint, tokens_from_metadata
from sparseflash.layout.profile import ProfileParams, run_profile
from sparseflash.model.loader import open_dense
from sparseflash.model.perplexity import windows
from sparseflash.model.text import corpus_ids
from sparseflash.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "sparseflash" / "models" / "tiny-relu2" / "heldout.txt.zst"
SMALL = ["--corpus", str(HELDOUT), "--tokens", "1024", "--ppl-tokens", "512", "--ctx", "64", "--ppl-steps", "4"]


def _train_series_module():
    """bench/train_series.py as a module (bench/ is not a package)."""
    if "train_series" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_series", ROOT / "bench" / "train_series.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_series"] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules["train_series"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machines are shared: tiny models run much faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The --quick ReLU² series: 8 checkpoints at log-spaced token counts."""
    out = tmp_path_factory.mktemp("series")
    return _train_series_module().train_series(out, "relu2", quick=True, quiet=True)


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, needle, out_dir):
    assert code == 2
    assert err.startswith("sparseflash: error:") and err.count("\n") == 1 and needle in err, err
    assert not Path(out_dir).exists()


def test_quick_series_has_log_spaced_token_counts(series):
    counts = [tokens_from_metadata(p) for p in series]
    assert len(series) == 8 and all(c is not None for c in counts)
    ratios = np.diff(np.log(counts))
    assert np.all(ratios > 0) and ratios.max() < 2 * ratios.min()


def test_trend_json_and_plots(series, tmp_path, capsys):
    out = tmp_path / "trend"
    code, stdout, _ = _run(["sparsity-trend", "-m", *map(str, series), *SMALL, "-o", str(out), "--json"], capsys)
    assert code == 0
    s = json.loads(stdout)
    assert [c["tokens_trained"] for c in s["checkpoints"]] == [tokens_from_metadata(p) for p in series]
    for c in s["checkpoints"]:
        assert 0 < c["activation_ratio"] <= c["nonzero_ratio"] <= 1  # thresholds only remove neurons
        assert len(c["layers"]) == 2 and c["activation_ratio"] == pytest.approx(
            np.mean([e["activation_ratio"] for e in c["layers"]]))
    fit = s["fit"]
    assert s["form"] == fit["form"] == "logspace"  # auto: ReLU² -> logspace power law
    assert set(fit["params"]) == {"c", "alpha", "b", "A0"} and "limit_ratio" in fit
    assert fit["r2"] is None or fit["r2"] <= 1
    assert s["fits"]["ppl"]["power"]["form"] == "power" and s["trend"]["direction"] in ("increasing", "decreasing")
    saved = json.loads((out / "trend.json").read_text())
    assert saved["fit"] == fit
    for name in ("trend.png", "trend_layers.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_forced_form_is_honoured(series, tmp_path, capsys):
    """--form power on a ReLU² series: the power law's own minimum length applies (3 points are too few)."""
    code, _, err = _run(["sparsity-trend", "-m", *map(str, series[:3]), *SMALL, "--form", "power",
                         "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "a power fit needs at least 4 checkpoints", tmp_path / "o")


def test_ratio_agrees_with_profile(series, tmp_path):
    """The trend's PPL-p% activation ratio is the profiler's, on the same tokens and settings."""
    model = open_dense(series[-1])
    ids = corpus_ids(HELDOUT, model.tokenizer, 2048)
    calib, heldout = ids[:1024], ids[1024:1536]
    prof = run_profile(model, calib, heldout, tmp_path / "prof",
                       ProfileParams(tokens=1024, ctx=64, cett_tokens=1024, ppl_tokens=512, ppl_steps=4), quiet=True)
    got = measure_checkpoint(model, windows(calib, 64, 1024), heldout,
                             TrendParams(tokens=1024, ctx=64, ppl_tokens=512, ppl_steps=4))
    assert got["ppl_bound"] == prof["ppl_bound"]
    assert got["activation_ratio"] == pytest.approx(1 - prof["ppl_p_sparsity"], abs=1e-6)
    assert got["activation_ratio_cett"] == pytest.approx(1 - prof["sparsity"], abs=1e-6)


def test_width_depth_mode(tmp_path, capsys):
    """Five untrained shapes of one budget: ratio vs width/depth, two-segment fit, bottleneck inside."""
    ts = _train_series_module()
    folders = []
    for shape in ts.QUICK_WIDTH_DEPTH:
        folder = tmp_path / f"L{shape.layers}"
        ts.save_checkpoint(ts.build_model(shape, "relu2", 64, seed=shape.layers).eval(), folder, {})
        folders.append(str(folder))
    out = tmp_path / "wd"
    small = [*SMALL[:2], "--tokens", "512", "--ppl-tokens", "256", "--ctx", "64", "--ppl-steps", "3"]
    code, stdout, _ = _run(["sparsity-trend", "--width-depth", "-m", *folders, *small, "-o", str(out), "--json"], capsys)
    assert code == 0
    s = json.loads(stdout)
    x = [c["width_depth_ratio"] for c in s["checkpoints"]]
    assert x == sorted(x) and x[0] == 1.0 and x[-1] == 64.0
    assert s["fit"]["form"] == "hinge" and x[1] <= s["fit"]["bottleneck"] <= x[-2]
    assert s["budget"]["spread"] < 0.5
    assert (out / "width_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_single_checkpoint_is_refused(series, tmp_path, capsys):
    code, _, err = _run(["sparsity-trend", "-m", str(series[0]), *SMALL, "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "series of checkpoints", tmp_path / "o")


def test_series_too_short_for_the_law_is_refused(series, tmp_path, capsys):
    code, _, err = _run(["sparsity-trend", "-m", *map(str, series[:4]), *SMALL, "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "at least 5 checkpoints", tmp_path / "o")


def test_non_monotone_token_counts_are_refused(series, tmp_path, capsys):
    counts = ["100", "200", "300", "250", "400", "500", "600", "700"]
    code, _, err = _run(["sparsity-trend", "-m", *map(str, series), "--tokens-trained", *counts, *SMALL,
                         "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "must increase", tmp_path / "o")


def test_wrong_number_of_token_counts_is_refused(series, tmp_path, capsys):
    code, _, err = _run(["sparsity-trend", "-m", *map(str, series), "--tokens-trained", "1", "2", *SMALL,
                         "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "2 counts for 8 checkpoints", tmp_path / "o")


def test_missing_token_count_is_refused(series, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(series[3], bare)
    (bare / "training.json").unlink()
    paths = [*map(str, series[:3]), str(bare), *map(str, series[4:])]
    code, _, err = _run(["sparsity-trend", "-m", *paths, *SMALL, "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "no token count", tmp_path / "o")
    (bare / "trainer_state.json").write_text(json.dumps({"num_input_tokens_seen": 5000}))
    assert tokens_from_metadata(bare) == 5000


def test_mismatched_tokenizer_is_refused(series, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(series[5], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]  # one merge fewer: a different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    paths = [*map(str, series[:5]), str(other), *map(str, series[6:])]
    code, _, err = _run(["sparsity-trend", "-m", *paths, *SMALL, "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "tokenizer.json differs", tmp_path / "o")


def test_mismatched_vocabulary_is_refused(series, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(series[5], other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 5000
    (other / "config.json").write_text(json.dumps(config))
    paths = [*map(str, series[:5]), str(other), *map(str, series[6:])]
    code, _, err = _run(["sparsity-trend", "-m", *paths, *SMALL, "-o", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "vocabulary of 5000 tokens", tmp_path / "o")
