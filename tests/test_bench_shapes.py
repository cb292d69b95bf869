"""bench_vs_llamacpp.py --shape: the plan (cap, resident dtype, set-up steps) without running, and
the rows of its output schema."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import vs_llamacpp_shapes as shapes  # noqa: E402
from bench_prepare import SHAPES  # noqa: E402


def dry_run(shape: str, share: float, tmp_path, *extra: str, check: bool = True):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vs_llamacpp.py"), "--shape", shape,
                          "--cap-share", str(share), "--dry-run", "--checkpoint", str(tmp_path / "none"),
                          "--work-dir", str(tmp_path / "work"), *extra], capture_output=True, text=True, check=check,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout) if check else out


def test_configs_and_io_threads_choose_what_runs(tmp_path):
    plan = dry_run("1b", 0.5, tmp_path, "--configs", "llama.cpp-mmap,sparseflash-exact", "--io-threads", "4")
    assert list(plan["configs"]) == ["llama.cpp-mmap", "sparseflash-exact"]
    assert plan["configs"]["sparseflash-exact"]["policy"] == {"io_threads": 4, "io_buffer_bytes": 1 << 20,
                                                              "strategy": "all"}
    assert plan["configs"]["llama.cpp-mmap"]["policy"] == {}
    assert dry_run("1b", 0.5, tmp_path)["configs"]["sparseflash-window"]["policy"]["io_threads"] is None  # planned
    bad = dry_run("1b", 0.5, tmp_path, "--configs", "sparseflash-exact,nope", check=False)
    assert bad.returncode != 0 and "--configs: unknown name" in bad.stderr and "Traceback" not in bad.stderr


def test_the_7b_plan_keeps_f16_at_60_percent_and_quantizes_at_half(tmp_path):
    half = dry_run("7b", 0.5, tmp_path)
    b = shapes.shape_bytes(SHAPES["7b"], "f16")
    assert half["weight_allowance_bytes"] == int(0.5 * b["gguf_bytes_estimate"])
    f16 = half["resident_dtype_table"][0]
    assert f16["resident_bytes"] + f16["predictor_bytes_estimate"] + f16["io_buffer_bytes"] + f16["cache_bytes"] \
        == half["weight_allowance_bytes"]
    # at half, f16 leaves 12% of the FFN for bundles, of which the staging region takes half: q8
    assert f16["cache_share_of_ffn"] > shapes.MIN_CACHE_SHARE > f16["cache_share_after_staging"]
    assert half["resident_dtype"] == "q8"
    assert dry_run("7b", 0.6, tmp_path)["resident_dtype"] == "f16"
    assert any("export-gguf" in s for s in half["setup_steps"]) and any("prepare" in s for s in half["setup_steps"])
    assert not (tmp_path / "work").exists()  # a dry run makes nothing


def test_the_staging_region_comes_out_of_the_cache_estimate():
    # c + 2 (1 - c) / L = share: the halves hold one layer's misses each
    for share, layers in ((0.3, 22), (0.12, 32), (0.5, 4)):
        c = shapes.staged_cache_share(share, layers)
        assert c + 2 * (1 - c) / layers == pytest.approx(share)
    assert shapes.staged_cache_share(0.05, 32) == 0.0  # the staging alone would take more
    assert shapes.staged_cache_share(1.2, 22) == 1.2  # every layer cached: no staging


def test_resident_bytes_of_the_7b_shape():
    # Llama-2-7B: 32 x 4 x 4096^2 attention + 2 x 32000 x 4096 embedding and head, 2 bytes each
    assert shapes.shape_bytes(SHAPES["7b"], "f16")["resident_bytes"] == (32 * 4 * 4096**2 + 2 * 32000 * 4096) * 2
    assert shapes.shape_bytes(SHAPES["7b"], "q8")["resident_bytes"] == (32 * 4 * 4096**2 + 2 * 32000 * 4096) // 32 * 34


def test_config_rows_follow_the_schema():
    err = shapes.config_row("sparseflash-exact", {"error": "waits for quantized resident tensors"})
    assert err["decode_tok_s"] is None and err["error"].startswith("waits")
    run = {"prefill_s": 0.5, "decode_s": 2.0, "tokens": list(range(11)), "engine_bytes_read": 40 << 20,
           "hit_rate": 0.5, "predicted_per_token": 10.0, "io_wait_s": 1.0, "read_busy_s": 0.1, "model_read_s": 0.08}
    r = {"runs": [run, run], "load_s": 1.0, "gen_read_bytes": 88 << 20, "load_read_bytes": 0, "ru_maxrss_bytes": 100 << 20,
         "cgroup_peak_bytes": 50 << 20, "engine_bytes_read": 80 << 20, "memory_plan": {}, "direct_io": True,
         "strategy": "all", "io": {"threads": 4}}
    row = shapes.config_row("sparseflash-exact", r)
    assert row["decode_tok_s"] == pytest.approx(20 / 4.0)
    assert row["disk_mib_per_token"] == pytest.approx(88 / 22)
    assert row["achieved_gbps"] == pytest.approx((80 << 20) / 0.2 / 1e9)
    assert row["device_model_gbps"] == pytest.approx((80 << 20) / 0.16 / 1e9)
    assert row["peak_mib"] == pytest.approx(50)
    assert "device_mib_per_token" not in row  # no device counters in the run: no device columns
    row = shapes.config_row("sparseflash-exact", dict(r, device_read_bytes=66 << 20, device_reads=33, device_busy_s=2.0))
    assert row["device_mib_per_token"] == pytest.approx(66 / 22)
    assert row["device_gbps_busy"] == pytest.approx((66 << 20) / 2.0 / 1e9)
    assert row["device_busy_share"] == pytest.approx(2.0 / 5.0)
    assert row["device_kib_per_request"] == pytest.approx(2048)
    assert "dev GB/s busy" in shapes.table({"cap_share": 0.5, "tokens": 10, "prompts": ["a"], "loadavg_before": [0],
                                             "loadavg_after": [0], "models": [{"shape": "1b", "configs": [row]}]})
    assert {"name", "decode_tok_s", "disk_mib_per_token", "achieved_gbps", "peak_mib"} <= set(row)
    assert row["achieved_share_of_now"] is None  # no same-minute disk figure: no share of it
    row = shapes.config_row("sparseflash-exact", dict(r, disk_now_gbps=0.5))
    assert row["disk_now_gbps"] == 0.5 and row["achieved_share_of_now"] == pytest.approx(row["achieved_gbps"] / 0.5)
    llama = {k: v for k, v in r.items() if k != "engine_bytes_read"}  # page faults: no read spans to time
    assert shapes.config_row("llama.cpp-mmap", dict(llama, disk_now_gbps=0.5))["achieved_share_of_now"] is None


def test_the_disk_is_read_now_at_the_plans_request_size_and_depth(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    gbps = shapes.disk_now(str(path), {"io_plan": {"io_threads": 2, "io_buffer_bytes": 65536}})
    assert gbps is not None and gbps > 0
    assert shapes.disk_now(str(tmp_path / "missing.bin"), {}) is None  # a run's figure, never a crash
    (tmp_path / "small.bin").write_bytes(bytes(5000))
    assert shapes.disk_now(str(tmp_path / "small.bin"), {}) is None


def test_prepare_tokens_shorten_calibration_and_name_the_layout(tmp_path):
    default = shapes.shape_params(SHAPES["7b"], None)
    short = shapes.shape_params(SHAPES["7b"], 512)
    assert (default.profile_tokens, default.heldout_tokens) == (2048, 512)
    assert (short.profile_tokens, short.predictor_tokens, short.cett_tokens, short.heldout_tokens) == (512, 512, 512, 256)
    assert short.rank == default.rank and short.epochs == default.epochs  # nothing else changes
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vs_llamacpp.py"), "--shape", "7b",
                          "--cap-share", "0.5", "--dry-run", "--prepare-tokens", "512", "--checkpoint",
                          str(tmp_path / "none"), "--work-dir", str(tmp_path / "work")], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    p = json.loads(out.stdout)
    assert p["prepare_tokens"] == 512 and p["prepare_params"]["profile_tokens"] == 512
    assert p["layout"].endswith("prepared-7b-q8-t512/model.sflash")


def test_device_read_counters_are_read_and_subtract():
    from memcap import DeviceReads, device_reads

    before = device_reads(ROOT / "README.md")
    if before is None:
        pytest.skip("no block-device counters for this file system")
    assert before.bytes >= 0 and before.busy_s >= 0
    assert (DeviceReads(10, 2, 1.5) - DeviceReads(4, 1, 0.5)) == DeviceReads(6, 1, 1.0)


def test_layout_facts_report_the_stored_resident_dtype(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))
    from layouts import tiny_layout

    import sparseflash.runtime.diskprobe as diskprobe
    from sparseflash.runtime.iomodel import DeviceModel

    monkeypatch.setattr(diskprobe, "device_model_for", lambda path: DeviceModel())  # no probe in a unit test
    _, f16 = tiny_layout(tmp_path / "a", "llama-relu2", dtype="f16")
    _, q8 = tiny_layout(tmp_path / "b", "nemotron", dtype="f16", resident_dtype="q8")
    a, b = shapes.layout_facts(Path(f16), 16, 1 << 30), shapes.layout_facts(Path(q8), 16, 1 << 30)
    assert (a["resident_dtype"], b["resident_dtype"]) == ("f16", "q8")
    assert b["min_budget_bytes"] > b["resident_bytes"] > 0
