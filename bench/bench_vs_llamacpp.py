"""sparseflash against llama.cpp on the same model and prompts, side by side, in one run.

Each configuration runs in its own subprocess, alone in its own memory cgroup:

  llama-mem      llama.cpp (llama-cpp-python) with the model read into memory (use_mmap=False)
  llama-mmap     llama.cpp with the model mmap'd (use_mmap=True) under a memory cap below the model size
  sf-dense       sparseflash in memory (open_dense + generate; weights held as float32)
  sf-stream      sparseflash streaming the predicted FFN neurons from its layout under the same cap
  sf-stream-all  the same, computing every neuron (exact; the I/O of dense streaming through the cache)

The cap: the capped processes get the same bytes W for model weights, W = --cap-share x the GGUF
file's size, on top of what each holds besides the weights (interpreter, libraries, KV cache,
compute buffers). A memory cgroup enforces it, page cache included, so llama.cpp's mmap'd weights
compete for W and are paged in again. Its limit, non-weight + W, is set right after loading:
llama.cpp's non-weight memory is its usage then minus the GGUF's cached pages; sparseflash's
--budget is W and its non-weight memory its baseline + KV cache + slack (vs_llamacpp_runs.py has
the details). Without a usable memory cgroup the capped configurations run uncapped and the
output says so: RLIMIT_AS is no substitute (it refuses the mmap rather than paging it), and
posix_fadvise(DONTNEED) cannot evict pages a process has mapped.

Per configuration: decode and end-to-end tokens/s, load time, block-device bytes read per
generated token, peak RSS and cgroup peak, and greedy agreement with llama-mem (definitions in
vs_llamacpp_report.py). Models: the bundled tiny-relu2 (trained) and a random-weight nemotron
(bigmodel.py; its streamed figures show the I/O machinery, not trained sparsity).

    python bench/bench_vs_llamacpp.py [--quick] [--tokens 64] [--cap-share 0.7] [--threads 1]
        [--no-big] [--big-hidden 2048] [--big-layers 16] [--big-intermediate 8192] [--out FILE.json]

With --shape quick|1b|7b it compares llama.cpp mmap with sparseflash's exact, window and predicted
streaming on a random-weight llama shape instead (vs_llamacpp_shapes.py; --layout-dir, --dry-run).

Progress goes to stderr, the table to stdout, all figures to --out (written atomically). GGUFs,
layouts and the random model are kept in --work-dir for the next run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memcap import MemoryCgroups, cached_bytes, drop_page_cache, find_memory_cgroups, read_ahead_kb  # noqa: E402
from vs_llamacpp_report import CONFIG_TITLES, DEFINITIONS, MiB, format_model, summarize_run  # noqa: E402

PROMPTS = (
    "The os module provides a portable way of using operating system dependent functionality.",
    "def read_config(path):\n    \"\"\"Read a JSON configuration file and return a dict.\"\"\"\n",
    "To create a virtual environment, run",
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- subprocesses ---------------------------------------------------------------------------------

def run_worker(job: dict, tmp: Path, timeout_s: float, cgroups: MemoryCgroups | None = None) -> dict:
    """Run ``job`` in ``bench_vs_llamacpp.py --worker`` (alone in a fresh cgroup when given); its result."""
    tag = f"{job['config']}-{time.monotonic_ns()}"
    job = dict(job, result=str(tmp / f"{tag}.result.json"))
    job_file = tmp / f"{tag}.job.json"
    job_file.write_text(json.dumps(job))
    group = cgroups.create(tag) if cgroups else None
    if group is not None:
        job["cgroup"] = {"parent": str(cgroups.parent), "version": cgroups.files.version, "group": str(group)}
        job_file.write_text(json.dumps(job))
    preexec = (lambda: cgroups.join(group)) if group is not None else None  # noqa: E731 (charged from exec on)
    threads = str(job["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)],
                            stdout=subprocess.DEVNULL, preexec_fn=preexec, env=env)
    out: dict = {}
    try:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout_s:.0f} s"}
        if group is not None:
            out["oom_kills"] = cgroups.oom_kills(group)
            out["cgroup_peak_after_exit"] = cgroups.peak(group)
        if code != 0 or not Path(job["result"]).exists():
            why = f"exit code {code}" + (" (killed by the cgroup OOM killer)" if out.get("oom_kills") else "")
            return {**out, "error": why}
        return {**json.loads(Path(job["result"]).read_text()), **out}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if group is not None:
            cgroups.remove(group)


# -- one model ------------------------------------------------------------------------------------

def model_job(setup: dict, args, weight_allowance: int | None) -> dict:
    """The job fields every configuration of one model shares."""
    longest = max(len(p) for p in setup["prompt_ids"])
    return {"prompt_ids": setup["prompt_ids"], "tokens": args.tokens, "threads": args.threads,
            "gguf": setup["gguf"], "checkpoint": setup["checkpoint"], "layout": setup["layout"],
            "n_ctx": -(-(longest + args.tokens + 1) // 64) * 64, "n_batch": -(-longest // 32) * 32,
            "time_limit_s": args.time_limit, "weight_allowance_bytes": weight_allowance,
            "budget_bytes": weight_allowance or setup["layout_weight_bytes"], "kv_bytes": setup["kv_bytes"]}


def warm_up(setup: dict, args, tmp: Path) -> None:
    """Run every configuration once, briefly and uncapped, so that the libraries' pages (torch,
    llama.cpp, numba's cached kernels) sit in the page cache outside the measured cgroups: measured
    processes then read from disk mostly the model files, and only those are charged to their caps.
    (Not all: the kernel may reclaim idle library pages at any time, and then they are read again.)"""
    job = dict(model_job(setup, args, None), prompt_ids=setup["prompt_ids"][:1], tokens=2)
    for config in CONFIG_TITLES:
        r = run_worker(dict(job, config=config), tmp, args.timeout)
        if "error" in r:
            log(f"warm-up of {config} failed: {r['error']}")


def bench_model(setup: dict, args, cgroups: MemoryCgroups | None, tmp: Path) -> dict:
    weight_allowance = int(args.cap_share * setup["gguf_bytes"])
    job = model_job(setup, args, weight_allowance)
    files = [setup["gguf"], setup["layout"], *setup["checkpoint_files"]]
    results, rows = {}, {}
    for config in CONFIG_TITLES:
        if config == "sf-stream" and weight_allowance < setup["min_budget_bytes"]:
            results[config] = {"error": f"budget {weight_allowance / MiB:.1f} MiB is below the engine's minimum of "
                                        f"{setup['min_budget_bytes'] / MiB:.1f} MiB; raise --cap-share"}
        else:
            drop_page_cache(files)
            left = sum(cached_bytes(f) for f in files)
            log(f"{setup['name']}: {CONFIG_TITLES[config]} (model files in the page cache: {left / MiB:.1f} MiB) ...")
            t, load = time.perf_counter(), os.getloadavg()[0]
            results[config] = run_worker(dict(job, config=config), tmp, args.timeout, cgroups)
            results[config].update(page_cache_before_bytes=left, loadavg_before=load, loadavg_after=os.getloadavg()[0],
                                   wall_s=time.perf_counter() - t)
            log(f"  {time.perf_counter() - t:.0f} s" + (f", FAILED: {results[config]['error']}"
                                                         if "error" in results[config] else ""))
        rows[config] = summarize_run(results[config], results.get("llama-mem"))
    return {"model": {k: v for k, v in setup.items() if k != "prompt_ids"}, "weight_allowance_bytes": weight_allowance,
            "n_ctx": job["n_ctx"], "read_ahead_kb": read_ahead_kb(setup["gguf"]), "rows": rows, "raw": results}


def write_json_atomic(path: Path, obj) -> None:
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def environment() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "llama_cpp_python": version("llama_cpp_python"), "torch": version("torch")}


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bundled model only, 16 new tokens")
    p.add_argument("--shape", choices=("quick", "1b", "7b"), default=None,
                   help="instead: a random-weight llama shape of bench_prepare.py (vs_llamacpp_shapes.py)")
    p.add_argument("--layout-dir", default=None, help="with --shape: a prepared layout folder (model.sflash) to use")
    p.add_argument("--checkpoint", default=None, help="with --shape: the checkpoint (default: bench_prepare's cache)")
    p.add_argument("--prepare-tokens", type=int, default=None,
                   help="with --shape: calibration tokens of the layout it prepares (held-out: half); only the "
                        "predicted row uses what calibration builds (default: bench_prepare's figures)")
    p.add_argument("--dry-run", action="store_true", help="with --shape: print the plan (sizes, cap, steps) and stop")
    p.add_argument("--configs", default=None, help="with --shape: the configurations to run, comma-separated "
                   "(default: all)")
    p.add_argument("--io-threads", type=int, default=None, help="with --shape: reads in flight of every sparseflash "
                   "row, 1 MiB each (default: both planned from the disk's model)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 64; 16 with --quick)")
    p.add_argument("--cap-share", type=float, default=0.7,
                   help="memory for weights in the capped configurations, as a share of the GGUF size (default 0.7)")
    # One thread by default: on a machine whose few cores are shared with other jobs, llama.cpp's thread
    # barriers made 2 threads up to 100x slower than one here (docs/gguf.md, "Benchmark against llama.cpp").
    p.add_argument("--threads", type=int, default=1, help="compute threads of every engine (default 1)")
    p.add_argument("--no-big", action="store_true", help="skip the random-weight model")
    p.add_argument("--big-hidden", type=int, default=2048)
    p.add_argument("--big-layers", type=int, default=16)
    p.add_argument("--big-intermediate", type=int, default=8192)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where GGUFs and the big model are kept between runs (default $SPARSEFLASH_CACHE/bench-vs-llamacpp)")
    p.add_argument("--time-limit", type=float, default=240.0,
                   help="seconds of generation per configuration after which remaining prompts are skipped")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds before a measured subprocess is killed")
    p.add_argument("--setup-timeout", type=float, default=3600.0,
                   help="seconds before a set-up subprocess (export, build, prepare) is killed")
    p.add_argument("--out", type=Path, default=Path("bench_vs_llamacpp.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = 16 if args.quick or args.shape == "quick" else 64
    if args.quick:
        args.no_big = True
    if not 0 < args.cap_share < 1:
        p.error("--cap-share must be in (0, 1): the cap is meant to be smaller than the model")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        from vs_llamacpp_runs import worker_main

        return worker_main(args.worker)
    if args.shape:
        from vs_llamacpp_shapes import run_shape

        if args.dry_run:
            return run_shape(args)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed; nothing to compare against. Skipping "
              "(pip install llama-cpp-python to run this benchmark).")
        return 0
    if args.shape:
        return run_shape(args)
    from bigmodel import BigShape

    from sparseflash.layout.pipeline import cache_root

    work = args.work_dir or cache_root() / "bench-vs-llamacpp"
    cgroups, notes = find_memory_cgroups()
    if cgroups is not None:
        cgroups.remove_stale()
        mechanism = f"{cgroups.mechanism} (child of {cgroups.parent})"
    else:
        mechanism = ("NONE: no usable memory cgroup (" + "; ".join(notes) + "); the 'capped' configurations "
                     "run uncapped. RLIMIT_AS is no substitute: it refuses the mmap instead of paging it.")
    log(f"memory cap: {mechanism}")
    started = time.perf_counter()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "mechanism": mechanism,
              "cap_share": args.cap_share, "tokens": args.tokens, "prompts": list(PROMPTS),
              "environment": environment(), "models": []}
    setups = [("setup-bundled", {})]
    if not args.no_big:
        shape = BigShape(hidden=args.big_hidden, layers=args.big_layers, intermediate=args.big_intermediate)
        setups.append(("setup-big", {"shape": asdict(shape)}))
    tables, bundled = [], None
    with tempfile.TemporaryDirectory(prefix="sfbench-") as tmp:
        for kind, extra in setups:
            log(f"{kind}: making the GGUF and the layout (cached in {work}) ...")
            setup = run_worker({"config": kind, "work_dir": str(work), "prompts": list(PROMPTS), "tokens": args.tokens,
                                "threads": os.cpu_count() or 1, **extra}, Path(tmp), args.setup_timeout)
            if "error" in setup:
                log(f"{kind} failed ({setup['error']}); skipping this model")
                report["models"].append({"setup": kind, "error": setup["error"]})
                continue
            bundled = setup if kind == "setup-bundled" else bundled
            if bundled is not None:
                log("warm-up: each configuration once on the bundled model, uncapped, to cache the libraries' pages")
                warm_up(bundled, args, Path(tmp))
            m = bench_model(setup, args, cgroups, Path(tmp))
            report["models"].append(m)
            tables.append(format_model(m, mechanism))
            write_json_atomic(args.out, report)
    report["seconds"] = time.perf_counter() - started
    write_json_atomic(args.out, report)
    print(f"# sparseflash vs llama.cpp: {args.tokens} new tokens x {len(PROMPTS)} prompts, greedy, "
          f"{args.threads} thread(s)\n")
    print(DEFINITIONS + "\n")
    print("\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s in all; figures in {args.out}")
    return 0


if __name__ == "__main__":
    from sparseflash.errors import SparseflashError

    try:
        sys.exit(main())
    except SparseflashError as e:  # bad input (e.g. too few --prepare-tokens for one held-out window): one line
        sys.exit(f"bench: {e}")
