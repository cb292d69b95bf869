"""`sparseflash inspect` on good, compressed and corrupted layout files."""

import json

import numpy as np
from layouts import tiny_layout

from sparseflash.layout.build import write_layout
from sparseflash.layout.format import LayoutFile
from sparseflash.tools.cli import main


def test_inspect_verify_json(tmp_path, capsys):
    _, path = tiny_layout(tmp_path, "llama-silu", dtype="bf16")
    capsys.readouterr()
    assert main(["inspect", str(path), "--verify", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verified"] is True and r["header"]["model"]["gated"] is True and len(r["layers"]) == 2
    assert "tokenizer_json" not in r["header"]


def test_zstd_layout_reports_compression_and_reads_back(tmp_path, capsys):
    model, plain = tiny_layout(tmp_path, "nemotron", dtype="f16")
    perms = [np.arange(model.config.intermediate_size, dtype=np.int32)] * model.config.num_layers
    packed = tmp_path / "z.sflash"
    write_layout(model, packed, perms, 0, [0.0, 0.0], "f16", zstd_level=3, quiet=True)
    capsys.readouterr()
    assert main(["inspect", str(packed), "--json"]) == 0
    z = json.loads(capsys.readouterr().out)["compression"]
    assert 0 < z["ratio"] <= 1 and z["decode_mb_per_s"] > 0
    with LayoutFile.open(packed) as f, LayoutFile.open(plain) as g:
        perm = g.permutation(1)
        assert np.array_equal(f.read_bundles(1, start=0, count=160)[perm], g.read_bundles(1, start=0, count=160))


def test_inspect_corrupted_file_exits_2(tmp_path, capsys):
    _, path = tiny_layout(tmp_path, "nemotron")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the index
    bad = tmp_path / "bad.sflash"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparseflash: error:") and "bad.sflash" in err[0]
    assert main(["run", "-m", str(bad), "--budget", "1GiB", "-n", "1"]) == 2
    assert main(["inspect", str(tmp_path / "none.sflash")]) == 2
