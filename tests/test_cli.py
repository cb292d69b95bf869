"""The command line: main job outputs and one-line errors with exit code 2 for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from tiny_models import EVAL_CORPUS, make_hf_model, save_hf_model

from sparseflash.tools.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json_on_bundled_model(capsys):
    code, out, _ = run_cli(capsys, "run", "-p", "The os module", "-n", "8", "--greedy", "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["tokens"]) == 8 and result["tokens_per_s"] > 0
    assert isinstance(result["text"], str) and result["text"]


def test_sampling_is_reproducible_with_seed(capsys):
    args = ("run", "-n", "12", "--seed", "5", "--ignore-eos", "--json")
    a = json.loads(run_cli(capsys, *args)[1])["tokens"]
    b = json.loads(run_cli(capsys, *args)[1])["tokens"]
    c = json.loads(run_cli(capsys, "run", "-n", "12", "--seed", "6", "--ignore-eos", "--json", "--temp", "1.5")[1])
    assert a == b and c["tokens"] != a


def test_info_json(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["arch"] == "nemotron" and info["layers"] == 6
    assert info["ffn_bytes_per_layer"]["f16"] == 2 * 256 * 1024 * 2


def test_eval_ppl_json(capsys):
    code, out, _ = run_cli(capsys, "eval-ppl", "--text", str(EVAL_CORPUS), "--tokens", "1024", "--json")
    r = json.loads(out)
    assert code == 0 and r["tokens"] == 4 * 255 and 5 < r["ppl"] < 200


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save_hf_model(make_hf_model("nemotron"), tmp_path_factory.mktemp("good"))


def _copy(good_folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good_folder, dst)
    return dst


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparseflash: error:"), err
    assert needle in lines[0]


def test_missing_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", "-m", str(tmp_path / "nope"))
    _assert_one_line_error(code, err, "no such checkpoint folder")


def test_unknown_model_type(capsys, good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "run", "-m", str(folder), "-n", "2")
    _assert_one_line_error(code, err, "'gpt2' is not supported (supported: arcee, llama, mistral, nemotron)")


def test_unknown_activation(capsys, good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "tanh"
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "info", "-m", str(folder))
    _assert_one_line_error(code, err, "hidden_act 'tanh' is not supported")


def test_truncated_safetensors(capsys, good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    code, _, err = run_cli(capsys, "run", "-m", str(folder), "-n", "2")
    _assert_one_line_error(code, err, "model.safetensors")


def test_missing_tokenizer(capsys, good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    (folder / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "run", "-m", str(folder), "-n", "2")
    _assert_one_line_error(code, err, "tokenizer.json not found")


def test_missing_tensor(capsys, good_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(good_folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    code, _, err = run_cli(capsys, "info", "-m", str(folder))
    _assert_one_line_error(code, err, "'model.layers.1.mlp.down_proj.weight' is missing")


def test_context_overflow_is_refused(capsys):
    code, _, err = run_cli(capsys, "run", "-n", "600")
    _assert_one_line_error(code, err, "exceeds the model's context of 512")


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", "info", "-m", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
