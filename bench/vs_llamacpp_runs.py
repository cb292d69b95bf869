"""What runs inside the subprocesses of bench_vs_llamacpp.py: model set-up and one measured run each.

A measured run (``run_measured``) is one configuration in a fresh process that sits alone in its
own memory cgroup. It imports what it needs and warms up, records its baseline (cgroup usage before
the model is opened), loads the model and generates greedily from every prompt, reading
/proc/self/io around loading and around generation, and writes its figures as JSON.

A capped configuration gets ``weight_allowance_bytes`` (W) for model weights on top of what it
holds besides them (its non-weight memory). The cgroup limit, non-weight + W, is written right
after loading; a limit below the usage makes the kernel reclaim page cache down to it at once.
- llama-mmap: non-weight is the cgroup's usage after loading minus the GGUF's pages in the page
  cache: the interpreter, llama.cpp's library, KV cache and compute buffers.
- sf-stream, sf-stream-all: --budget is W (resident tensors, predictors, hot region, neuron cache,
  index and I/O buffers all count); non-weight is the baseline + KV cache + what opening the layout
  holds beyond the planned parts it loads (measured: RSS growth at load minus resident, predictors,
  hot region, index and I/O buffers; `unplanned_load_bytes`) + a slack for what a forward step
  allocates on the fly. sf-stream computes the neurons its predictors pick;
  sf-stream-all computes every neuron (strategy "all": exact, the dense model's function) through
  the same cache.

The set-up runs (``setup_bundled``, ``setup_big``) make the GGUF and the layout of a model and
tokenize the prompts, so that measured processes import nothing they do not need.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from memcap import V1, V2, MemoryCgroups, cached_bytes, device_reads, process_read_bytes

from sparseflash.errors import SparseflashError

CONFIGS = ("llama-mem", "llama-mmap", "sf-dense", "sf-stream", "sf-stream-all")
# 4 I/O threads as sparseflash's default, but 256 KiB buffers instead of 1 MiB: they count in the
# budget, and 4 MiB would be a third of the bundled model's whole budget.
STREAM_POLICY = {"io_threads": 4, "io_buffer_bytes": 256 << 10}


def stream_slack(weight_allowance: int) -> int:
    """Bytes a streamed process may hold beyond budget and KV cache: activations, logits, the
    kernel's outputs, the engine's 1 MiB blocks for down-column norms, allocator slack (8 MiB plus
    3% of the allowance)."""
    return 8 * (1 << 20) + weight_allowance * 3 // 100


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def log(msg: str) -> None:
    print(f"  [{os.getpid()}] {msg}", file=sys.stderr, flush=True)


def write_json(path: str | os.PathLike, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -- set-up -----------------------------------------------------------------------------------------

def _layout_facts(layout: Path, prompts_max_len: int, tokens: int) -> dict:
    """Sizes the caller needs to map a cap to a budget: weights, FFN, the engine's minimum, KV bytes."""
    from sparseflash.runtime.budget import plan_memory
    from sparseflash.runtime.build import resident_bytes
    from sparseflash.runtime.diskprobe import device_model_for
    from sparseflash.runtime.iomodel import DeviceModel
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.policy import Budget, Policy
    from sparseflash.runtime.predict import load_predictors
    from sparseflash.runtime.streamer import BundleReader

    device = device_model_for(layout)  # probed once per file system and cached, so never in a measured run
    lm = open_layout(layout)
    try:
        c = lm.config
        policy = Policy(Budget(nbytes=1 << 60), **STREAM_POLICY)
        pred_bytes = load_predictors(lm.file, lm.header, policy.strategy, policy.lookahead).nbytes
        reader = BundleReader(str(layout), list(lm.file.layers), DeviceModel(), "direct",
                              STREAM_POLICY["io_threads"], STREAM_POLICY["io_buffer_bytes"])
        io_total = reader.buffer_total_bytes
        reader.close()
        plan = plan_memory(lm.file.layers, resident_bytes(lm.weights), pred_bytes, io_total, policy.budget,
                           policy.min_slots)
        weight, ffn = lm.weight_bytes, lm.ffn_bytes
        kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * (prompts_max_len + tokens)  # f32 KVCache
        return {"layout_weight_bytes": weight, "ffn_bytes": ffn, "resident_bytes": plan.resident,
                "predictor_bytes": pred_bytes, "hot_bytes": plan.hot, "io_buffer_bytes": io_total,
                "min_budget_bytes": plan.minimum, "kv_bytes": kv,
                "device": {"latency_s": device.latency_s, "bandwidth_bps": device.bandwidth_bps}}
    finally:
        lm.close()


def _profile_facts(layout: Path) -> dict:
    """Sparsity at the thresholds the layout uses, and the predictors' held-out recall."""
    preds = json.loads((layout.parent / "predictors" / "predictors.json").read_text())
    mean, strategy = preds["mean"], preds["strategy"]
    return {"thresholds": preds["thresholds"], "strategy": strategy, "sparsity": mean["true_sparsity"],
            "predictor_recall": mean[f"recall_{strategy}"], "predicted_sparsity": mean[f"sparsity_{strategy}"]}


def _setup_common(checkpoint: Path, gguf: Path, layout: Path, job: dict) -> dict:
    from sparseflash.model.gguf_export import export_gguf
    from sparseflash.model.tokenizer import TextTokenizer

    if not gguf.exists():
        log(f"exporting {gguf.name} (f16) ...")
        export_gguf(checkpoint, gguf, "f16")
    tok = TextTokenizer.from_file(checkpoint / "tokenizer.json")
    prompt_ids = [tok.encode(p) for p in job["prompts"]]
    facts = _layout_facts(layout, max(len(p) for p in prompt_ids), job["tokens"])
    try:
        facts["profile"] = _profile_facts(layout)
    except (OSError, ValueError, KeyError):
        facts["profile"] = {}
    files = sorted(str(p) for p in checkpoint.glob("*.safetensors"))
    return {"checkpoint": str(checkpoint), "checkpoint_files": files, "gguf": str(gguf), "layout": str(layout),
            "gguf_bytes": gguf.stat().st_size, "prompt_ids": prompt_ids, **facts}


def setup_bundled(job: dict) -> dict:
    from sparseflash.layout.pipeline import prepare_bundled
    from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir

    checkpoint = default_model_dir()
    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / f"tiny-relu2-{checkpoint_hash(checkpoint)}-f16.gguf"
    layout = prepare_bundled(quiet=True, log=log)
    return {"name": "tiny-relu2 (bundled, trained)", **_setup_common(checkpoint, gguf, layout, job)}


def setup_big(job: dict) -> dict:
    import torch
    from bigmodel import LAYOUT, PREDICTORS, PROFILE, BigShape, build_random_nemotron, prepare_random

    from sparseflash.layout.pipeline import bundled_texts
    from sparseflash.model.checkpoint import default_model_dir

    torch.set_num_threads(job["threads"])
    shape = BigShape(**job["shape"])
    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    log(f"building {shape.name} (random weights, f16) ...")
    checkpoint = build_random_nemotron(shape, work / shape.name, default_model_dir() / "tokenizer.json")
    log(f"  {time.perf_counter() - t:.0f} s; preparing its layout (profile, predictors, layout) ...")
    calib, held = bundled_texts()
    layout = prepare_random(checkpoint, calib, held, work / f"{shape.name}-prepared", log=log)
    log(f"  {time.perf_counter() - t:.0f} s")
    source = json.loads((layout.parent / "bench_prepare.json").read_text())["source_hash"]
    out = _setup_common(checkpoint, work / f"{shape.name}-{source}-f16.gguf", layout, job)
    return {"name": f"{shape.name} (random weights)", "shape": asdict(shape),
            "prepare_params": {"profile": asdict(PROFILE), "predictors": asdict(PREDICTORS), "layout": LAYOUT}, **out}


# -- measured runs ----------------------------------------------------------------------------------

class _Cap:
    """The measured process's own cgroup (or none): baseline, limit, peak."""

    def __init__(self, spec: dict | None):
        self.spec = spec
        if spec:
            self.cg = MemoryCgroups(Path(spec["parent"]), V1 if spec["version"] == 1 else V2)
            self.group = Path(spec["group"])

    def usage(self) -> int | None:
        return self.cg.usage(self.group) if self.spec else None

    def limit_to(self, nbytes: int) -> None:
        self.cg.set_limit(self.group, nbytes)

    def reset_peak(self) -> bool:
        return self.cg.reset_peak(self.group) if self.spec else False

    def peak(self) -> int | None:
        return self.cg.peak(self.group) if self.spec else None


def _greedy_llama(llm, prompt: list[int], n: int, np, llama_cpp) -> dict:
    """Greedy decoding with llama.cpp's own decode calls; times like sparseflash's generate()."""
    vocab = llm.n_vocab()

    def argmax_last() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = [argmax_last()]
    while len(out) < n:
        llm.eval([out[-1]])
        out.append(argmax_last())
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t1, "tokens": out}


def _limit_with_retry(cap: _Cap, nbytes: int, tries: int = 20) -> None:
    """Set a limit below the current usage: the kernel reclaims page cache first (EBUSY while it cannot)."""
    for i in range(tries):
        try:
            cap.limit_to(nbytes)
            return
        except OSError:
            if i == tries - 1:
                raise
            time.sleep(0.1)


def _prepare_engine(config: str, threads: int):
    """Import and warm up what ``config`` needs, before the baseline is taken."""
    if config.startswith("llama"):
        import llama_cpp  # noqa: F401
        return
    import torch

    torch.set_num_threads(threads)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's thread pool
    if config.startswith("sf-stream"):
        from sparseflash.kernels import get_backend

        get_backend("cpu").warmup()  # compile (or load) the kernels


def _open_engine(config: str, job: dict, result: dict):
    """Load the model; returns (generate(prompt ids) -> run dict, close())."""
    if config.startswith("llama"):
        import llama_cpp
        import numpy as np

        llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_batch=job["n_batch"],
                              n_ubatch=job["n_batch"], n_threads=job["threads"], n_threads_batch=job["threads"],
                              use_mmap=config == "llama-mmap", use_mlock=False, verbose=False)
        return (lambda prompt: _greedy_llama(llm, prompt, job["tokens"], np, llama_cpp)), llm.close

    from sparseflash.model.generate import Sampling, generate

    if config == "sf-dense":
        from sparseflash.model.loader import open_dense

        net = open_dense(job["checkpoint"]).transformer()

        def run_dense(prompt):
            r = generate(net, prompt, job["tokens"], Sampling(greedy=True), stop_at_eos=False)
            return {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "tokens": r.tokens}

        return run_dense, lambda: None

    from sparseflash.runtime.session import open_streamed, stream_generate

    policy = {**STREAM_POLICY, **job.get("stream_policy", {})}  # the --shape runs plan their I/O (vs_llamacpp_shapes.py)
    strategy = policy.pop("strategy", "all" if config == "sf-stream-all" else None)
    streamed = open_streamed(job["layout"], budget=int(job["budget_bytes"]), strategy=strategy, **policy)
    reader = streamed.engine.fetcher.reader
    result["io"] = {"threads": reader.threads, "buffer_bytes": reader.buffer_bytes,
                    "merge_gap_blocks": reader.merge_gap_blocks, "device_model": reader.device.to_dict()}
    result["memory_plan"] = {k: getattr(streamed.engine.memory, k) for k in
                             ("budget", "resident", "predictors", "hot", "cache", "index", "io_buffers",
                              "slots_per_layer", "minimum")}
    result["direct_io"] = streamed.engine.fetcher.reader.direct
    result["strategy"] = streamed.engine.strategy

    def run_streamed(prompt):
        r, summary = stream_generate(streamed, prompt, job["tokens"], Sampling(greedy=True), stop_at_eos=False)
        return {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "tokens": r.tokens,
                "engine_bytes_read": summary["bytes_read"], "hit_rate": summary["hit_rate"],
                "predicted_per_token": summary["predicted_per_token"], "io_wait_s": summary["io_wait_s"],
                "read_busy_s": summary["read_busy_s"], "model_read_s": summary["bytes_read"] / 1e9
                / summary["device_model_gbps"] if summary["device_model_gbps"] > 0 else 0.0}

    return run_streamed, streamed.close


def run_measured(job: dict) -> dict:
    """One configuration, start to end: baseline, cap, load, generate from every prompt; its figures."""
    config = job["config"]
    cap = _Cap(job.get("cgroup"))
    result = {"config": config}
    _prepare_engine(config, job["threads"])
    result["baseline_bytes"] = cap.usage()
    rss0 = _rss()
    allowance = job.get("weight_allowance_bytes") if cap.spec else None

    io0, t0 = process_read_bytes(), time.perf_counter()
    generate_one, close = _open_engine(config, job, result)
    result["load_s"] = time.perf_counter() - t0
    result["after_load_bytes"] = cap.usage()
    if allowance is not None and config == "llama-mmap":
        mapped = cached_bytes(job["gguf"])  # all brought in (and charged) here: the cache was dropped before
        result["non_weight_bytes"] = result["after_load_bytes"] - mapped
        if job.get("llama_slack"):  # the --shape runs give llama.cpp the same slack as sparseflash
            result["non_weight_bytes"] += stream_slack(allowance)
    elif config.startswith("sf-stream"):
        # what opening the layout holds beyond the planned parts it loads (tokenizer, header, index of
        # digests, I/O threads): measured, like llama.cpp's non-weight memory, not assumed
        plan = result["memory_plan"]
        loaded = sum(plan[k] for k in ("resident", "predictors", "hot", "index", "io_buffers"))
        result["unplanned_load_bytes"] = max(0, _rss() - rss0 - loaded)
        if allowance is not None:
            result["non_weight_bytes"] = (result["baseline_bytes"] + result["unplanned_load_bytes"] + job["kv_bytes"]
                                          + stream_slack(allowance))
    if "non_weight_bytes" in result:
        result["cap_bytes"] = result["non_weight_bytes"] + allowance
        _limit_with_retry(cap, result["cap_bytes"])  # below the usage: the kernel reclaims page cache first
    result["cgroup_peak_load_bytes"] = cap.peak()
    result["peak_reset"] = cap.reset_peak()  # from here on the peak is that of generation
    io1 = process_read_bytes()
    result["load_read_bytes"] = io1 - io0
    weights = job["gguf"] if config == "llama-mmap" else job["layout"]
    dev0 = device_reads(weights)

    runs, started = [], time.perf_counter()
    for i, prompt in enumerate(job["prompt_ids"]):
        if runs and time.perf_counter() - started > job["time_limit_s"]:
            log(f"{config}: time limit of {job['time_limit_s']:.0f} s reached, skipping prompts {i + 1}..")
            break
        run = generate_one(prompt)
        steps = len(run["tokens"]) - 1
        log(f"{config}: prompt {i + 1}/{len(job['prompt_ids'])}: prefill {run['prefill_s']:.2f} s, "
            f"decode {steps / run['decode_s'] if run['decode_s'] > 0 else 0:.2f} tok/s")
        runs.append(run)
    result["gen_read_bytes"] = process_read_bytes() - io1
    dev1 = device_reads(weights)
    if dev0 is not None and dev1 is not None:  # the device's view of the same span (every process's reads)
        d = dev1 - dev0
        result.update(device_read_bytes=d.bytes, device_reads=d.reads, device_busy_s=d.busy_s)
    result["runs"] = runs
    if config.startswith("sf-stream"):
        result["engine_bytes_read"] = sum(r["engine_bytes_read"] for r in runs)
    result["cgroup_peak_bytes"] = cap.peak()
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    close()
    return result


def worker_main(job_path: str) -> int:
    """Entry point of ``bench_vs_llamacpp.py --worker JOB``: run the job, write its result file."""
    job = json.loads(Path(job_path).read_text())
    kind = job["config"]
    if kind == "setup-bundled":
        out = setup_bundled(job)
    elif kind == "setup-big":
        out = setup_big(job)
    elif kind == "setup-shape":
        from vs_llamacpp_shapes import setup_shape

        out = setup_shape(job)
    elif kind in CONFIGS:
        try:
            out = run_measured(job)
        except SparseflashError as e:  # a budget below the engine's minimum, a stale artefact: one line
            out = {"config": kind, "error": str(e)}
    else:
        raise SystemExit(f"unknown worker job {kind!r}")
    write_json(job["result"], out)
    return 0
