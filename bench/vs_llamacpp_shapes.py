"""``bench_vs_llamacpp.py --shape quick|1b|7b``: llama.cpp mmap against sparseflash streaming on the
random-weight llama shapes of bench_prepare.py, under one memory cap, in one run.

Configurations (each in its own subprocess and memory cgroup, as in bench_vs_llamacpp.py):

  llama.cpp-mmap         llama.cpp (llama-cpp-python), the f16 GGUF mmap'd, capped; llama.cpp has no
                         ReLU-gated llama, so the GGUF says SiLU (same bytes and work per token)
  sparseflash-exact      every neuron computed (strategy all: the dense model's function), the cache
                         evicting by the default policy, reads planned from the disk's queue-depth model
  sparseflash-exact-unstaged  the same without the staging region (each layer's misses read on
                         demand when the layer runs, in batches that overlap its own compute)
  sparseflash-window     the same neurons through LLM-in-a-Flash's plain window policy (eviction window)
  sparseflash-predicted  the layout's predictors pick the neurons; random weights, so its tokens
                         diverge from the others and its sparsity means nothing (labelled so)

The cap: W = --cap-share x the GGUF's bytes for weights, on top of each process's non-weight memory
(vs_llamacpp_runs.py) and the same slack for both engines (stream_slack: 8 MiB + 3% of W; without
it llama.cpp's lazily grown buffers met the OOM killer on the small shapes); sparseflash's --budget is W. Where the layout's resident tensors (f16) with
the predictors, I/O buffers and a neuron cache of MIN_CACHE_SHARE of the FFN bytes do not fit W,
the layout is made with quantized resident tensors (q8, else q4; LayoutParams.resident_dtype), and
a given layout that does not fit is reported as waiting for them instead of being run.

Per configuration the output's ``configs[]`` holds name, decode_tok_s, disk_mib_per_token (block-device
reads of the process, /proc/self/io), achieved_gbps and peak_mib (cgroup peak when capped, else peak
RSS). achieved_gbps is sparseflash's bytes read over the time its reads were in flight, next to
device_model_gbps, the disk model's figure for the same reads at the same queue depth; llama.cpp's
page faults have no observable busy time, so its figure is disk bytes over generation wall time (a
lower bound). After each configuration the disk is read for 3 s at the sparseflash plan's request
size and reads in flight (disk_now_gbps): a shared disk drifts from the cached model, so
achieved_share_of_now = achieved_gbps / disk_now_gbps is the like-for-like share. Load average is
recorded around every configuration and the whole run.

    python bench/bench_vs_llamacpp.py --shape quick --cap-share 0.5 --out F.json [--layout-dir D]
        [--checkpoint C] [--work-dir W] [--dry-run]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

CONFIGS = {  # output name -> (worker configuration, stream policy)
    "llama.cpp-mmap": ("llama-mmap", {}),
    "sparseflash-exact": ("sf-stream-all", {"strategy": "all"}),
    # the same without the staging region (runtime/staging.py): misses read on demand, in batches
    "sparseflash-exact-unstaged": ("sf-stream-all", {"strategy": "all", "staging": False}),
    "sparseflash-window": ("sf-stream-all", {"strategy": "all", "eviction": "window"}),
    "sparseflash-predicted": ("sf-stream", {}),
}
AUTO_IO = {"io_threads": None, "io_buffer_bytes": None}  # planned from the device model (session.io_policy)
RESIDENT_DTYPES = ("f16", "q8", "q4")  # tried in this order
MIN_CACHE_SHARE = 0.10  # the neuron cache must hold at least this share of the FFN bytes
IO_BYTES = 32 << 20  # the I/O buffers the automatic plan takes at most (session.IO_MEMORY_BYTES, 1/16 of W)
PREDICTOR_BYTES_PER_VALUE = 4  # predictors held as float32: the estimate before a layout exists
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- sizes, cap and resident dtype, from the shape alone ------------------------------------------

def shape_bytes(shape, dtype: str) -> dict:
    """Bytes of the shape's resident matrices (attention, embedding, head) in ``dtype`` and of its FFN
    in f16 (the layout's bundles), and the GGUF's f16 weight bytes."""
    from sparseflash.layout.schema import part_bytes

    d, hd = shape.hidden, shape.hidden // shape.heads
    rows_d = shape.layers * (2 * d + 2 * shape.kv_heads * hd) + 2 * shape.vocab  # rows of length d
    resident = rows_d * part_bytes(d, dtype)  # (wo's rows are q_dim = d long here: heads x head_dim = d)
    ffn = shape.layers * 3 * shape.intermediate * d * 2
    return {"resident_bytes": resident, "ffn_bytes": ffn, "gguf_bytes_estimate": shape.params() * 2}


def staged_cache_share(share: float, layers: int) -> float:
    """The neuron cache's share of each layer once strategy ``all``'s staging region has taken its bytes
    from ``share`` (runtime/budget.py): its two halves each hold one layer's misses, so with c of each
    layer cached they cost 2 (1 - c) / L of the FFN, and c + 2 (1 - c) / L = share. A cache that holds
    every layer needs no staging."""
    if share >= 1:
        return share
    return max(0.0, (share - 2 / layers) / (1 - 2 / layers))


def choose_resident_dtype(shape, allowance: int, size_share: float) -> tuple[str | None, list[dict]]:
    """The first of RESIDENT_DTYPES whose resident tensors, predictors (estimated from ``size_share``,
    own + look-ahead), I/O buffers and a neuron cache of MIN_CACHE_SHARE of the FFN (after the staging
    region exact streaming takes from it) fit ``allowance`` bytes; None when none does. Also the table
    of what each needs."""
    rows = []
    for dtype in RESIDENT_DTYPES:
        b = shape_bytes(shape, dtype)
        predictors = int(2 * size_share * b["ffn_bytes"] / 2 * PREDICTOR_BYTES_PER_VALUE)
        io = min(IO_BYTES, allowance // 16)  # session.io_policy's limit
        cache = allowance - b["resident_bytes"] - predictors - io
        share = staged_cache_share(cache / b["ffn_bytes"], shape.layers)
        rows.append({"resident_dtype": dtype, "resident_bytes": b["resident_bytes"], "predictor_bytes_estimate": predictors,
                     "io_buffer_bytes": io, "cache_bytes": cache, "cache_share_of_ffn": cache / b["ffn_bytes"],
                     "cache_share_after_staging": share, "fits": share >= MIN_CACHE_SHARE})
    return next((r["resident_dtype"] for r in rows if r["fits"]), None), rows


def shape_params(shape, prepare_tokens: int | None):
    """bench_prepare's parameters for ``shape``; ``prepare_tokens`` (``--prepare-tokens``) lowers its
    calibration tokens to that many and its held-out tokens to half as many (at least one window).
    Only the predicted configuration uses what calibration builds (predictors, thresholds); on random
    weights its figures mean nothing anyway, so a shorter preparation changes no exact or window row."""
    from prepare_worker import bench_params

    from sparseflash.layout.params import ProfileParams

    params = bench_params(shape)
    if not prepare_tokens:
        return params
    held = max(ProfileParams.ctx, prepare_tokens // 2)
    return replace(params, profile_tokens=prepare_tokens, predictor_tokens=prepare_tokens,
                   cett_tokens=min(params.cett_tokens, prepare_tokens), heldout_tokens=min(params.heldout_tokens, held))


def plan(args) -> dict:
    """Where everything is and will go, the cap and the resident dtype: no model is read."""
    from bench_prepare import SHAPES, bench_dir

    from sparseflash.layout.params import PredictorParams
    from sparseflash.layout.pipeline import cache_root

    shape = SHAPES[args.shape]
    work = Path(args.work_dir or cache_root() / "bench-vs-llamacpp").resolve()
    checkpoint = Path(args.checkpoint or bench_dir() / f"llama-relu-{shape.name}-bf16").resolve()
    gguf = work / f"{checkpoint.name}-f16.gguf"
    gguf_bytes = gguf.stat().st_size if gguf.exists() else shape_bytes(shape, "f16")["gguf_bytes_estimate"]
    allowance = int(args.cap_share * gguf_bytes)
    tokens = getattr(args, "prepare_tokens", None)
    params = shape_params(shape, tokens)
    dtype, table = choose_resident_dtype(shape, allowance, PredictorParams.size_share)
    suffix = f"-t{tokens}" if tokens else ""
    layout_dir = (Path(args.layout_dir).resolve() if args.layout_dir
                  else work / f"prepared-{shape.name}-{dtype or 'q4'}{suffix}")
    layout = layout_dir / "model.sflash"
    texts = ("read CAL HELD < <(python -c 'from sparseflash.layout.pipeline import bundled_texts as b; "
             "print(*b())')")
    steps = []
    if not checkpoint.exists():
        steps.append(f"python bench/bench_prepare.py --shapes {shape.name} --keep  # builds {checkpoint.name}")
    if not gguf.exists():
        steps.append(f"sparseflash export-gguf -m {gguf.with_suffix('.silu-view')} -o {gguf} --dtype f16  "
                     f"# a copy of {checkpoint.name} (symlinks) whose config.json says hidden_act silu")
    if not layout.exists() and args.layout_dir:
        steps.append(f"# waits: the given --layout-dir holds no model.sflash yet ({layout})")
    elif not layout.exists():
        steps.append(f"{texts}; sparseflash prepare -m {checkpoint} --corpus $CAL --heldout $HELD --tokens "
                     f"{params.profile_tokens} --heldout-tokens {params.heldout_tokens} --resident-dtype {dtype or 'q4'} "
                     f"-o {layout_dir}  # the bench calls layout.pipeline.prepare with prepare_params")
    return {"shape": asdict(shape), "checkpoint": str(checkpoint), "checkpoint_exists": checkpoint.exists(),
            "gguf": str(gguf), "gguf_exists": gguf.exists(), "gguf_bytes": gguf_bytes, "cap_share": args.cap_share,
            "weight_allowance_bytes": allowance, "resident_dtype": dtype, "resident_dtype_table": table,
            "layout": str(layout), "layout_given": bool(args.layout_dir), "layout_exists": layout.exists(),
            "prepare_params": {**asdict(replace(params, resident_dtype=dtype))}, "prepare_tokens": tokens,
            "setup_steps": steps,
            "configs": {name: {"worker": w, "policy": {**AUTO_IO, **p} if w != "llama-mmap" else {}}
                        for name, (w, p) in CONFIGS.items()}}


# -- set-up (in a subprocess) ---------------------------------------------------------------------

def _stamp(checkpoint: Path) -> dict:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(checkpoint.glob("*.safetensors"))}


def silu_view(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint as llama.cpp's llama architecture can run it: the same files (symlinks) with
    config.json saying SiLU. llama.cpp has no ReLU-gated llama, and its SiLU gate reads the same
    bytes and does the same arithmetic per token, so its speed is the same; its tokens are not the
    ReLU model's (random weights: no run here is about tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        link = folder / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    return folder


def setup_shape(job: dict) -> dict:
    """Make what the plan lacks (checkpoint, GGUF, layout), probe the disk, tokenize the prompts and
    measure the layout's fixed memory: the figures the measured runs need."""
    from bench_prepare import SHAPES, build_checkpoint

    from sparseflash.layout.pipeline import bundled_texts, prepare
    from sparseflash.model.gguf_export import export_gguf
    from sparseflash.model.tokenizer import TextTokenizer

    p = job["plan"]
    shape, checkpoint, gguf, layout = SHAPES[p["shape"]["name"]], Path(p["checkpoint"]), Path(p["gguf"]), Path(p["layout"])
    if not checkpoint.exists():
        log(f"building the random {shape.name} checkpoint in {checkpoint} ...")
        build_checkpoint(shape, checkpoint)
    stamp_file = gguf.with_suffix(".source.json")
    if not gguf.exists() or not stamp_file.exists() or json.loads(stamp_file.read_text()) != _stamp(checkpoint):
        log(f"exporting {gguf.name} (f16) ...")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(silu_view(checkpoint, gguf.with_suffix(".silu-view")), gguf, "f16")
        stamp_file.write_text(json.dumps(_stamp(checkpoint)))
    if not layout.exists():
        if p["layout_given"]:
            raise SystemExit(f"--layout-dir {layout.parent} holds no model.sflash")
        log(f"preparing {layout} (resident {p['resident_dtype']}) ...")
        calib, held = bundled_texts()
        params = replace(shape_params(shape, p.get("prepare_tokens")), resident_dtype=p["resident_dtype"] or "q4")
        prepare(checkpoint, calib, held, layout.parent, params, quiet=True, log=log)
    tok = TextTokenizer.from_file(checkpoint / "tokenizer.json")
    prompt_ids = [tok.encode(t) for t in job["prompts"]]
    facts = layout_facts(layout, max(len(x) for x in prompt_ids) + job["tokens"], p["weight_allowance_bytes"])
    return {"name": f"llama-relu {shape.name} (random weights)", "checkpoint": str(checkpoint), "gguf": str(gguf),
            "gguf_ffn": "silu-gated: llama.cpp's llama FFN over the same weights (silu_view)",
            "layout": str(layout), "gguf_bytes": gguf.stat().st_size, "prompt_ids": prompt_ids,
            "checkpoint_files": sorted(str(f) for f in checkpoint.glob("*.safetensors")), **facts}


def layout_facts(layout: Path, positions: int, allowance: int) -> dict:
    """The layout's sizes, the disk model, the I/O plan and the engine's minimum budget under ``allowance``."""
    from sparseflash.runtime.budget import plan_memory
    from sparseflash.runtime.build import resident_bytes
    from sparseflash.runtime.diskprobe import device_model_for
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.policy import Budget, Policy
    from sparseflash.runtime.predict import load_predictors
    from sparseflash.runtime.session import io_policy

    device = device_model_for(layout)  # probed once per file system and cached: never inside a measured run
    io = io_policy(device, Budget(nbytes=allowance), dict(AUTO_IO))
    lm = open_layout(layout)
    try:
        c = lm.config
        preds = load_predictors(lm.file, lm.header, None, True).nbytes
        mem = plan_memory(lm.file.layers, resident_bytes(lm.weights), preds, io["io_threads"] * io["io_buffer_bytes"],
                          Budget(nbytes=1 << 60), Policy.min_slots)
        return {"layout_weight_bytes": lm.weight_bytes, "ffn_bytes": lm.ffn_bytes, "resident_bytes": mem.resident,
                "resident_dtype": lm.header.resident_dtype, "predictor_bytes": preds,
                "min_budget_bytes": mem.minimum, "io_plan": io, "device_model": device.to_dict(),
                "kv_bytes": 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * positions}  # f32 KV cache
    finally:
        lm.close()


# -- the run --------------------------------------------------------------------------------------

def config_row(name: str, r: dict) -> dict:
    """One entry of ``configs[]`` from a measured run's result (or its error)."""
    from vs_llamacpp_report import summarize_run

    if "error" in r:
        return {"name": name, "error": r["error"], "decode_tok_s": None, "disk_mib_per_token": None,
                "achieved_gbps": None, "peak_mib": None, "loadavg_before": r.get("loadavg_before"),
                "loadavg_after": r.get("loadavg_after")}
    s = summarize_run(r, None)
    runs = r["runs"]
    wall = sum(x["prefill_s"] + x["decode_s"] for x in runs)
    row = {"name": name, "decode_tok_s": s["decode_tokens_per_s"],
           "disk_mib_per_token": s["disk_bytes_per_token"] / MiB if s["disk_bytes_per_token"] is not None else None,
           "peak_mib": (s["cgroup_peak_bytes"] or s["peak_rss_bytes"]) / MiB,
           "peak_source": "cgroup peak (page cache included)" if s["cgroup_peak_bytes"] else "ru_maxrss"}
    if "engine_bytes_read" in r:
        nbytes = sum(x["engine_bytes_read"] for x in runs)
        busy, model = sum(x["read_busy_s"] for x in runs), sum(x["model_read_s"] for x in runs)
        row.update(achieved_gbps=nbytes / busy / 1e9 if busy > 0 else 0.0,
                   device_model_gbps=nbytes / model / 1e9 if model > 0 else 0.0,
                   achieved_share_of_model=model / busy if busy > 0 else 0.0, io=r.get("io"),
                   engine_mib_per_token=s["engine_bytes_per_token"] / MiB, hit_rate=s["hit_rate"],
                   strategy=s["strategy"], memory_plan=s["memory_plan"])
    else:
        row["achieved_gbps"] = r["gen_read_bytes"] / wall / 1e9 if wall > 0 else 0.0
        row["achieved_gbps_definition"] = "disk bytes / generation wall time (page faults: no busy time to observe)"
    if r.get("device_busy_s"):  # the block device's counters over generation: the same measure for every engine
        tokens = s["generated_tokens"] or 1
        row.update(device_mib_per_token=r["device_read_bytes"] / tokens / MiB,
                   device_gbps_busy=r["device_read_bytes"] / r["device_busy_s"] / 1e9,
                   device_gbps_wall=r["device_read_bytes"] / wall / 1e9 if wall > 0 else 0.0,
                   device_busy_share=r["device_busy_s"] / wall if wall > 0 else 0.0,
                   device_kib_per_request=r["device_read_bytes"] / max(r["device_reads"], 1) / 1024)
    now = r.get("disk_now_gbps")
    row.update(disk_now_gbps=now, achieved_share_of_now=row["achieved_gbps"] / now
               if now and row.get("device_model_gbps") is not None else None)
    row.update(tokens=s["generated_tokens"], prefill_s=s["prefill_s"], load_s=s["load_s"], cap_bytes=s["cap_bytes"],
               oom_kills=s["oom_kills"], loadavg_before=r.get("loadavg_before"), loadavg_after=r.get("loadavg_after"))
    if name == "sparseflash-predicted":
        row["note"] = "random weights: predicted neurons diverge from the dense function (tokens differ)"
    return row


def run_shape(args) -> int:
    """Plan, set up, run every configuration under the cap; write ``args.out`` with models[].configs[]."""
    from bench_vs_llamacpp import PROMPTS, environment, model_job, run_worker, write_json_atomic
    from memcap import cached_bytes, drop_page_cache, find_memory_cgroups

    p = plan(args)
    chosen = args.configs.split(",") if args.configs else list(CONFIGS)
    if any(c not in CONFIGS for c in chosen):
        raise SystemExit(f"--configs: unknown name in {args.configs!r} (names: {', '.join(CONFIGS)})")
    fixed_io = {} if args.io_threads is None else {"io_threads": args.io_threads, "io_buffer_bytes": 1 << 20}
    configs = {name: (w, {**policy, **fixed_io}) for name, (w, policy) in CONFIGS.items() if name in chosen}
    p["configs"] = {name: {"worker": w, "policy": {**AUTO_IO, **policy} if w != "llama-mmap" else {}}
                    for name, (w, policy) in configs.items()}  # what runs
    if args.dry_run:
        print(json.dumps(p, indent=1))
        return 0
    cgroups, notes = find_memory_cgroups()
    if cgroups is not None:
        cgroups.remove_stale()
    mechanism = f"{cgroups.mechanism} (child of {cgroups.parent})" if cgroups else "NONE (" + "; ".join(notes) + ")"
    log(f"{args.shape}: cap {p['weight_allowance_bytes'] / MiB:.0f} MiB for weights; memory cap: {mechanism}")
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "mechanism": mechanism,
              "cap_share": args.cap_share, "tokens": args.tokens, "threads": args.threads, "prompts": list(PROMPTS),
              "environment": environment(), "loadavg_before": os.getloadavg(), "models": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sfbench-") as tmp:
        setup = run_worker({"config": "setup-shape", "plan": p, "prompts": list(PROMPTS), "tokens": args.tokens,
                            "threads": args.threads}, Path(tmp), args.setup_timeout)
        model = {"shape": args.shape, "plan": p, "configs": []}
        report["models"].append(model)
        if "error" in setup:
            model["error"] = f"set-up failed: {setup['error']}"
            write_json_atomic(args.out, report)
            log(model["error"])
            return 1
        allowance = p["weight_allowance_bytes"] = int(args.cap_share * setup["gguf_bytes"])  # the real GGUF size
        model["setup"] = {k: v for k, v in setup.items() if k != "prompt_ids"}
        job = dict(model_job(setup, args, allowance), llama_slack=True)
        files = [setup["gguf"], setup["layout"], *setup["checkpoint_files"]]
        fits = allowance >= setup["min_budget_bytes"]
        log("warm-up: each configuration once, 2 tokens, uncapped, to cache the libraries' pages outside the caps")
        for name, (config, policy) in configs.items():
            if config == "llama-mmap" or fits:
                r = run_worker(dict(job, config=config, stream_policy={**AUTO_IO, **policy}, tokens=2,
                                    prompt_ids=job["prompt_ids"][:1]), Path(tmp), args.timeout)
                if "error" in r:
                    log(f"  warm-up of {name} failed: {r['error']}")
        for name, (config, policy) in configs.items():
            if config != "llama-mmap" and not fits:
                r = {"error": f"waits for quantized resident tensors: the layout's fixed part needs "
                              f"{setup['min_budget_bytes'] / MiB:.0f} MiB, the cap gives {allowance / MiB:.0f} MiB "
                              "(rebuild with --resident-dtype q8 or q4)"}
            else:
                drop_page_cache(files)
                log(f"{name} (model files in the page cache: {sum(cached_bytes(f) for f in files) / MiB:.1f} MiB) ...")
                load = os.getloadavg()
                r = run_worker(dict(job, config=config, stream_policy={**AUTO_IO, **policy}), Path(tmp), args.timeout,
                               cgroups)
                r.update(loadavg_before=load, loadavg_after=os.getloadavg())
                r["disk_now_gbps"] = disk_now(setup["layout"], setup)
            model["configs"].append(config_row(name, r))
            model.setdefault("raw", {})[name] = r
            log(f"  {name}: " + (r["error"] if "error" in r else f"{model['configs'][-1]['decode_tok_s']:.2f} tok/s"))
            write_json_atomic(args.out, report)
    report.update(loadavg_after=os.getloadavg(), seconds=time.perf_counter() - started)
    write_json_atomic(args.out, report)
    print(table(report))
    return 0


def disk_now(layout: str, setup: dict) -> float | None:
    """GB/s the disk gives right now at the sparseflash plan's request size and reads in flight (3 s of
    direct reads of the layout file, after each configuration): the limit next to its achieved rate,
    since a shared disk drifts from the cached device model (docs/figures.md)."""
    from sparseflash.errors import SparseflashError
    from sparseflash.runtime.diskprobe import rate_now

    io = setup.get("io_plan") or {}
    try:
        return rate_now(layout, io.get("io_buffer_bytes", 1 << 20), io.get("io_threads", 4), seconds=3.0) / 1e9
    except (OSError, SparseflashError):
        return None


def table(report: dict) -> str:
    lines = [f"# llama.cpp vs sparseflash, cap {report['cap_share']:.0%} of the weights, {report['tokens']} tokens x "
             f"{len(report['prompts'])} prompts; load {report['loadavg_before'][0]:.2f} -> {report['loadavg_after'][0]:.2f}",
             f"{'shape':<6}{'config':<28}{'tok/s':>8}{'MiB/tok':>9}{'GB/s':>7}{'model GB/s':>11}{'peak MiB':>10}"
             f"{'dev MiB/tok':>12}{'dev GB/s busy':>14}{'busy':>6}{'disk now':>9}"]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for m in report["models"]:
        for c in m["configs"]:
            busy = c.get("device_busy_share")
            lines.append(f"{m['shape']:<6}{c['name']:<28}{f(c['decode_tok_s']):>8}{f(c['disk_mib_per_token'], 1):>9}"
                         f"{f(c['achieved_gbps']):>7}{f(c.get('device_model_gbps')):>11}{f(c['peak_mib'], 0):>10}"
                         f"{f(c.get('device_mib_per_token'), 1):>12}{f(c.get('device_gbps_busy')):>14}"
                         f"{'-' if busy is None else f'{busy:.0%}':>6}{f(c.get('disk_now_gbps')):>9}"
                         + (f"  {c['error']}" if c.get("error") else ""))
    return "\n".join(lines)
