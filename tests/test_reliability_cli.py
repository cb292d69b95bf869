"""Command-line misuse is one line naming the argument and what it accepts, exit 2; values are checked
by the dataclasses that own them; NaN/inf never reaches sampling or a printed perplexity."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_run import assert_one_line_error, run_cli
from tiny_models import EVAL_CORPUS, TINY_RELU2

from sparseflash.errors import SparseflashError
from sparseflash.layout.params import LayoutParams, PredictorParams, ProfileParams, TrainParams
from sparseflash.model.generate import Sampling, generate, sample_token
from sparseflash.model.loader import open_dense
from sparseflash.model.perplexity import perplexity

CORPUS = TINY_RELU2 / "calibration.txt.zst"

TREND = ("-m", TINY_RELU2, TINY_RELU2, TINY_RELU2, "--corpus", CORPUS, "-o", "{tmp}/t")

ARGUMENT_ERRORS = {  # argv: text the one line must hold (the argument, and the accepted form)
    ("run", "-n", "abc"): ("-n/--n-predict", "invalid int value: 'abc'"),
    ("run", "-n"): ("-n/--n-predict", "expected one argument"),
    ("run", "--seed", "x"): ("--seed", "invalid int value"),
    ("run", "--eviction", "bogus"): ("--eviction", "choose from"),
    ("run", "--bogus"): ("unrecognized arguments: --bogus",),
    ("bogus",): ("invalid choice: 'bogus'", "choose from"),
    (): ("the following arguments are required: COMMAND",),
    ("profile", "-o", "x"): ("--corpus", "required"),
    ("export-gguf", "-m", "x", "-o", "y.gguf", "--dtype", "q4"): ("--dtype", "'f32', 'f16', 'bf16'"),
    ("eval-ppl", "--text", "t", "--ctx", "abc"): ("--ctx", "invalid int value"),
}


@pytest.mark.parametrize("argv", list(ARGUMENT_ERRORS), ids=lambda a: " ".join(a) or "no command")
def test_an_argument_error_is_one_line_naming_the_argument(argv):
    code, _, err = run_cli(*argv)
    line = assert_one_line_error(code, err, *ARGUMENT_ERRORS[argv])
    assert "--help" in line and "usage:" not in err


VALUE_ERRORS = {  # argv: text the line must hold
    ("run", "--top-p", "0"): "--top-p must be in (0, 1]",
    ("run", "--top-p", "1.5"): "--top-p must be in (0, 1]",
    ("run", "--temp", "nan"): "--temp must be a finite number >= 0",
    ("run", "--temp", "-1"): "--temp must be a finite number >= 0",
    ("run", "-n", "-1"): "-n must be >= 0",
    ("run", "--budget", "-5%"): "--budget '-5%' is not a size: use bytes (2GiB, 500MB), a share",
    ("run", "--budget", "0%ffn"): "FFN share must be in (0, 100]%ffn",
    ("profile", "--corpus", CORPUS, "-o", "{tmp}/p", "--ctx", "0"): "--ctx must be an integer >= 2, got 0",
    ("profile", "--corpus", CORPUS, "-o", "{tmp}/p", "--ppl-steps", "-1"): "--ppl-steps must be an integer >= 0",
    ("layout", "--profile", "{tmp}", "-o", "{tmp}/x.sflash", "--zstd", "99"): "--zstd must be an integer in [1, 22]",
    ("eval-ppl", "--text", EVAL_CORPUS, "--tokens", "-1"): "--tokens must be >= 1",
    ("eval-ppl", "--text", EVAL_CORPUS, "--ctx", "0"): "--ctx must be",
    ("predictors", "--profile", "{tmp}", "--corpus", CORPUS, "-o", "{tmp}/q", "--epochs", "0"):
        "--epochs must be an integer >= 1",
    ("predictors", "--profile", "{tmp}", "--corpus", CORPUS, "-o", "{tmp}/q", "--target-recall", "2"):
        "--target-recall must be a number in (0, 1]",
    ("predictors", "--profile", "{tmp}", "--corpus", CORPUS, "-o", "{tmp}/q", "--size-share", "0"):
        "--size-share must be a number in (0, 1]",
    ("run", "-n", "1", "--compress", "0"): "--compress must be a ratio (2, 4, 8, ...), auto or none; got '0'",
    ("plugins", "train", "--corpus", CORPUS, "--ratio", "4", "--lr", "nan", "-o", "{tmp}/x.plugin.safetensors"):
        "--lr must be a number in (0, inf), got nan",
    ("plugins", "train", "--corpus", CORPUS, "--ratio", "4", "-o", "{tmp}"): "is a directory, expected a plugin file",
    ("plugins", "train", "--corpus", CORPUS, "--ratio", "4", "-o", "{tmp}/no/x.plugin.safetensors"):
        "folder for the plugin file does not exist",
    ("sparsity-trend", *TREND, "--p", "nan"): "--p must be a number in (0, inf), got nan",
    ("sparsity-trend", *TREND, "--ppl-steps", "-1"): "--ppl-steps must be an integer >= 0",
    ("sparsity-trend", *TREND, "--ppl-tokens", "0"): "--ppl-tokens must be an integer >= 1",
    ("sparsity-trend", *TREND, "--ctx", "1"): "--ctx must be an integer >= 2",
    ("sparsity-trend", *TREND, "--tokens-trained", "-5", "2", "3"): "token count must be > 0, got -5",
}


@pytest.mark.parametrize("argv", list(VALUE_ERRORS), ids=lambda a: " ".join(str(x) for x in a if "/" not in str(x)))
def test_a_bad_value_is_one_line_before_any_work(argv, tmp_path):
    budget = ["-m", str(tmp_path / "x.sflash")] if "--budget" in argv else []
    code, out, err = run_cli(*[str(a).replace("{tmp}", str(tmp_path)) for a in argv], *budget, timeout=120)
    assert_one_line_error(code, err, VALUE_ERRORS[argv])
    assert out == ""


def test_dataclasses_own_their_ranges():
    for make in (lambda: Sampling(top_p=0.0), lambda: Sampling(temperature=math.nan), lambda: Sampling(seed=-1),
                 lambda: LayoutParams(zstd_level=99), lambda: LayoutParams(zstd_level=0), lambda: ProfileParams(ctx=0),
                 lambda: ProfileParams(ppl_p=math.inf), lambda: PredictorParams(size_share=0.0),
                 lambda: PredictorParams(rank=(4, -1)), lambda: TrainParams(epochs=0), lambda: TrainParams(lr=math.nan)):
        with pytest.raises(SparseflashError):
            make()
    assert Sampling(temperature=0.0).temperature == 0.0 and LayoutParams(zstd_level=22).zstd_level == 22


def test_non_finite_logits_are_refused_naming_the_step():
    logits = torch.zeros(10)
    logits[3] = math.nan
    for sampling in (Sampling(greedy=True), Sampling(greedy=False, temperature=1.0, top_p=0.5)):
        with pytest.raises(SparseflashError, match=r"generation step 4: the model produced NaN logits \(1 of 10"):
            sample_token(logits, sampling, torch.Generator(), step=4)
    logits[3] = math.inf
    with pytest.raises(SparseflashError, match="infinite logits"):
        sample_token(logits, Sampling(greedy=True), None)


@pytest.fixture(scope="module")
def poisoned():
    """The bundled model with one NaN in layer 1's up projection (what a writer bug could leave)."""
    model = open_dense(None)
    model.weights.layers[1].w_up[5, :] = math.nan
    return model


def test_nan_weights_stop_generation_with_one_error(poisoned):
    prompt = poisoned.tokenizer.encode("The os module")
    with pytest.raises(SparseflashError, match="generation step 0: the model produced NaN logits"):
        generate(poisoned.transformer(), prompt, 4, Sampling(greedy=True))


def test_nan_weights_never_print_perplexity_nan(poisoned):
    ids = poisoned.tokenizer.encode("The os module provides a portable way of using operating system functionality. "
                                    * 20)
    with pytest.raises(SparseflashError, match=r"windows 0-\d+: the negative log-likelihood is nan"):
        perplexity(poisoned.transformer(), ids, ctx=32)


@pytest.mark.skipif(not shutil.which("time") and not os.path.exists("/usr/bin/time"), reason="needs /usr/bin/time")
def test_run_json_peak_rss_is_what_usr_bin_time_measures():
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "sparseflash.tools.cli", "run",
                        "-n", "8", "--greedy", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    measured = [int(line.split()[1]) * 1024 for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB")][0]
    reported = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert abs(measured - reported) <= 0.02 * measured, (reported / 2**20, measured / 2**20)


def test_peak_rss_counts_children_and_is_never_below_ru_maxrss():
    import resource

    from sparseflash.runtime.rss import peak_rss_bytes

    subprocess.run([sys.executable, "-c", "pass"], check=True)
    peak = peak_rss_bytes()
    assert peak >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak >= resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 > 0


def test_a_bad_lookahead_raise_is_refused_before_the_bundled_model_is_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLASH_CACHE", str(tmp_path))  # an empty cache: preparing would take minutes
    code, out, err = run_cli("run", "--budget", "25%ffn", "-n", "1", "--lookahead-raise", "nan", timeout=30)
    assert_one_line_error(code, err, "--lookahead-raise must be a finite number of logits, got nan")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_bad_rank_spread_is_refused_before_anything_is_prepared(tmp_path):
    out_dir = tmp_path / "prep"
    code, out, err = run_cli("prepare", "-m", str(TINY_RELU2), "--corpus", str(tmp_path / "none.txt"),
                             "--rank-spread", "-1", "-o", str(out_dir), timeout=30)
    assert_one_line_error(code, err, "--rank-spread must be a number in [0, 4], got -1.0")
    assert out == "" and not out_dir.exists()
