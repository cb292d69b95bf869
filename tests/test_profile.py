"""`sparseflash profile` on the trained tiny-relu2 with real text."""

import json

import numpy as np
import pytest
from tiny_models import EVAL_CORPUS, TINY_RELU2

from sparseflash.tools.cli import main


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p"
    args = ["profile", "-m", str(TINY_RELU2), "--corpus", str(EVAL_CORPUS), "--tokens", "2048",
            "--cett-tokens", "2048", "--ppl-tokens", "1024", "--ppl-steps", "5", "-o", str(out), "--json"]
    return out, args


def test_profile_json_and_files(profiled, capsys):
    out, args = profiled
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("sparsity", "cett_bound", "mean_cett", "ppl_p", "ppl_p_sparsity", "tokens"):
        assert key in s
    assert s["tokens"] == 2048 and len(s["layers"]) == 6
    for layer in s["layers"]:
        assert set(layer["reuse"]) == {"1", "2", "4", "8", "16"}
        assert 0 <= layer["hot10_share"] <= 1 and layer["coact_gap"] > 0
        # the threshold sample is the whole calibration set here, so the bound holds exactly
        assert layer["mean_cett"] <= 0.2 + 1e-9
    prof = json.loads((out / "profile.json").read_text())
    # CETT-bounded sparsity counts small-but-nonzero neurons as inactive: well above exact zeros
    assert s["sparsity"] > prof["exact_zero_share"] + 0.02
    assert prof["ppl_at_bound"] <= prof["ppl_dense"] * 1.01 + 1e-9
    assert prof["source_hash"]
    for name in ("sparsity_vs_cett.png", "reuse_vs_activation.png", "coact_gap.png", "hot_cdf.png",
                 "thresholds.npz", "layer_000.npz", "masks/ppl_L5.bits.zst"):
        assert (out / name).exists(), name
    npz = np.load(out / "layer_002.npz")
    c = npz["ppl_coactivation"]
    assert np.array_equal(np.diag(c), npz["ppl_frequency"])
    assert not list(out.parent.glob(".p.tmp-*"))


def test_profile_missing_corpus(tmp_path, capsys):
    code = main(["profile", "--corpus", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "text file not found" in err and not (tmp_path / "o").exists()
