"""`sparseflash prepare` on checkpoints larger than the memory it may use: time and peak memory per stage.

Builds (and caches) random-weight gated-ReLU llama checkpoints in bf16, sharded with an index like
published ones, written shard by shard (never the whole model in memory):
  135m:  hidden 576, 30 layers, 1,536 neurons, 9 heads (3 kv), vocab 49,152, prepare's defaults (~0.27 GB)
  1b:    hidden 2048, 22 layers, 5,632 neurons, 32 heads (4 kv), vocab 32,000  (~2.2 GB)
  7b:    hidden 4096, 32 layers, 11,008 neurons, 32 heads, vocab 32,000, the Llama-2-7B shape (~13.5 GB)
  quick: hidden 256, 4 layers, 704 neurons (a few MB; for tests)
and runs `prepare` (layout/pipeline.py, what the CLI calls) on each in a subprocess alone in a
memory cgroup capped at 25% of the checkpoint's bytes on top of the process's own baseline
(interpreter and libraries, measured before the model is opened, as bench_vs_llamacpp does), page
cache included (bench/memcap.py). prepare gets the same figure as --memory.

Random weights test memory and time, not sparsity: their activations are dense and unstructured,
so the sparsity, recall and ordering figures of these runs mean nothing.

Per stage: wall seconds, peak anonymous memory (RssAnon, sampled), cgroup peak (page cache
included), tokens moved through the model. Cached under $SPARSEFLASH_BENCH_DIR or /tmp/sparseflash-bench.

    python bench/bench_prepare.py [--shapes 1b 7b] [--quick] [--cap-share 0.25] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memcap import drop_page_cache, find_memory_cgroups  # noqa: E402
from prepare_worker import BUNDLED, bench_params  # noqa: E402

SHARD_BYTES = 2 << 30  # published checkpoints shard at 2-10 GB


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tokens: int  # calibration tokens the run uses (0: prepare's defaults)
    heldout: int  # held-out tokens (PPL-p% search, predictor validation; 0: prepare's default)

    def params(self) -> int:
        d, n, hd = self.hidden, self.intermediate, self.hidden // self.heads
        attn = 2 * d * d + 2 * d * self.kv_heads * hd
        return self.layers * (attn + 3 * d * n + 2 * d) + 2 * self.vocab * d + d


SHAPES = {
    "quick": Shape("quick", 256, 4, 704, 4, 2, 4096, 1024, 512),
    "135m": Shape("135m", 576, 30, 1536, 9, 3, 49152, 0, 0),  # SmolLM-135M's shape at prepare's defaults
    "1b": Shape("1b", 2048, 22, 5632, 32, 4, 32000, 4096, 512),
    "7b": Shape("7b", 4096, 32, 11008, 32, 32, 32000, 2048, 512),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_dir() -> Path:
    return Path(os.environ.get("SPARSEFLASH_BENCH_DIR", "/tmp/sparseflash-bench"))


def _tensors(shape: Shape):
    """(name, shape, kind) of every tensor of the checkpoint, in file order."""
    d, n, hd = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    yield "model.embed_tokens.weight", (shape.vocab, d), "matrix"
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), "norm"
        yield p + "self_attn.q_proj.weight", (d, d), "matrix"
        yield p + "self_attn.k_proj.weight", (shape.kv_heads * hd, d), "matrix"
        yield p + "self_attn.v_proj.weight", (shape.kv_heads * hd, d), "matrix"
        yield p + "self_attn.o_proj.weight", (d, d), "matrix"
        yield p + "post_attention_layernorm.weight", (d,), "norm"
        yield p + "mlp.gate_proj.weight", (n, d), "matrix"
        yield p + "mlp.up_proj.weight", (n, d), "matrix"
        yield p + "mlp.down_proj.weight", (d, n), "matrix"
    yield "model.norm.weight", (d,), "norm"
    yield "lm_head.weight", (shape.vocab, d), "matrix"


def build_checkpoint(shape: Shape, folder: Path) -> Path:
    """Write a random bf16 LlamaForCausalLM (ReLU-gated FFN) shard by shard; cached by shape."""
    import torch
    from safetensors.torch import save_file

    marker = folder / "bench_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(shape):
        return folder
    need = shape.params() * 2 + (1 << 30)
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else "/").free
    if free < need:
        raise SystemExit(f"{folder}: needs {need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan, shard, size = [], [], 0
        for name, dims, kind in _tensors(shape):
            nbytes = 2 * int(torch.Size(dims).numel())
            if shard and size + nbytes > SHARD_BYTES:
                plan.append(shard)
                shard, size = [], 0
            shard.append((name, dims, kind))
            size += nbytes
        plan.append(shard)
        weight_map, total = {}, 0
        for k, tensors in enumerate(plan):
            file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            out = {}
            for name, dims, kind in tensors:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ 0x5EED)  # the same in every process
                t = torch.ones(dims) if kind == "norm" else torch.randn(dims, generator=g) * 0.02
                out[name] = t.to(torch.bfloat16)
                weight_map[name] = file
                total += out[name].numel() * 2
            save_file(out, str(tmp / file), metadata={"format": "pt"})
            log(f"{shape.name}: wrote {file} ({len(tensors)} tensors)")
            del out
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        hd = shape.hidden // shape.heads
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
                  "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
                  "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
                  "num_key_value_heads": shape.kv_heads, "head_dim": hd, "vocab_size": shape.vocab,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        shutil.copy(BUNDLED / "tokenizer.json", tmp / "tokenizer.json")  # 4,096 tokens: ids fit the vocab
        marker_tmp = tmp / "bench_shape.json"
        marker_tmp.write_text(json.dumps(asdict(shape)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def run_shape(shape: Shape, args, cgroups) -> dict:
    root = bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    checkpoint = build_checkpoint(shape, root / f"llama-relu-{shape.name}-bf16")
    files = sorted(str(p) for p in checkpoint.glob("*.safetensors"))
    ckpt_bytes = sum(os.path.getsize(f) for f in files)
    log(f"{shape.name}: checkpoint {ckpt_bytes / 2**30:.2f} GiB in {len(files)} shards "
        f"(ready in {time.perf_counter() - t:.0f} s)")
    out = root / f"prepared-{shape.name}"
    shutil.rmtree(out, ignore_errors=True)
    allowance = int(args.cap_share * ckpt_bytes)
    if shape.name == "quick":  # a few MB of weights: the fixed buffers (head block, batch) need more
        allowance = max(allowance, 512 << 20)
    job = {"checkpoint": str(checkpoint), "out": str(out), "shape": asdict(shape), "allowance_bytes": allowance,
           "checkpoint_bytes": ckpt_bytes, "threads": args.threads}
    job_file = root / f"job-{shape.name}.json"
    job["result"] = str(root / f"result-{shape.name}.json")
    Path(job["result"]).unlink(missing_ok=True)
    group = cgroups.create(shape.name) if cgroups else None
    if group is not None:
        job["cgroup"] = {"parent": str(cgroups.parent), "version": cgroups.files.version, "group": str(group)}
    job_file.write_text(json.dumps(job))
    drop_page_cache(files)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads))
    preexec = (lambda: cgroups.join(group)) if group is not None else None  # noqa: E731
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "prepare_worker.py"), str(job_file)],
                          preexec_fn=preexec, env=env)
    result = json.loads(Path(job["result"]).read_text()) if Path(job["result"]).exists() else {}
    if group is not None:
        result["oom_kills"] = cgroups.oom_kills(group)
        cgroups.remove(group)
    result.update({"shape": asdict(shape), "exit_code": proc.returncode, "checkpoint_bytes": ckpt_bytes,
                   "shards": len(files), "load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "capped": group is not None})
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)  # the layout is as large as the checkpoint
    return result


def table(r: dict) -> str:
    mib = 2**20
    s = r["shape"]
    lines = [f"{s['name']}: hidden {s['hidden']}, {s['layers']} layers, {s['intermediate']} neurons, "
             f"{r['checkpoint_bytes'] / 2**30:.2f} GiB bf16 in {r['shards']} shards; exit {r['exit_code']}"
             + (f" (OOM kills {r['oom_kills']})" if r.get("oom_kills") else "")]
    if "baseline_bytes" in r and r.get("plan"):
        lines.append(f"  baseline {r['baseline_bytes'] / mib:.0f} MiB, cap {r['cap_bytes'] / mib:.0f} MiB "
                     f"({'cgroup' if r['capped'] else 'NOT ENFORCED: no memory cgroup'}), expected peak "
                     f"{r['plan']['peak'] / mib:.0f} MiB ({r['plan']['peak_stage']})")
    lines.append(f"  {'stage':<20}{'wall s':>9}{'anon peak MiB':>15}{'cgroup peak MiB':>17}{'tokens':>12}")
    for st in r.get("stages", []):
        cg = f"{st['cgroup_peak_bytes'] / mib:.0f}" if st.get("cgroup_peak_bytes") else "-"
        lines.append(f"  {st['stage']:<20}{st['seconds']:>9.0f}{st['anon_peak_bytes'] / mib:>15.0f}{cg:>17}"
                     f"{st['tokens']:>12,}")
    if "total_seconds" in r:
        lines.append(f"  total {r['total_seconds']:.0f} s ({r['total_seconds'] / 60:.1f} min); load average "
                     f"before {r['load_average_before'][0]:.1f}, after {r['load_average_after'][0]:.1f}; "
                     f"cpu {r.get('cpu_seconds', 0):.0f} s"
                     + (f"; predictor training {r['predictor_train_seconds']:.0f} s of the predictors stage"
                        if r.get("predictor_train_seconds") is not None else ""))
    if r.get("error"):
        lines.append(f"  error: {r['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "7b"], choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true", help="the tiny shape only (a test of the bench itself)")
    ap.add_argument("--cap-share", type=float, default=0.25, help="memory for prepare, as a share of checkpoint bytes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the prepared directories")
    ap.add_argument("--out", default=None, help="write all figures to this JSON file")
    args = ap.parse_args()
    cgroups, notes = find_memory_cgroups()
    if cgroups is None:
        log("no memory cgroup: runs are NOT capped (" + "; ".join(notes) + ")")
    else:
        cgroups.remove_stale()
    shapes = ["quick"] if args.quick else args.shapes
    results = []
    print("Random weights test memory and time, not sparsity: their sparsity and recall figures mean nothing.")
    for name in shapes:
        r = run_shape(SHAPES[name], args, cgroups)
        results.append(r)
        print(table(r), flush=True)
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        Path(tmp).write_text(json.dumps({"runs": results, "params": {n: asdict(bench_params(SHAPES[n])) for n in shapes}},
                                        indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
