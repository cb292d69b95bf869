"""f16, q8 and q4 layouts of one model side by side: what quantizing bundles (and resident matrices)
costs in quality and saves in bytes, with llama.cpp's own Q8_0/Q4_0 as the quality reference.

For each layout (same profile, predictors and neuron order; only the storage differs), on the same
held-out tokens (the bundled model's held-out text after the 8,192 tokens preparation may have seen):
- exact ppl: the layout's weights, every neuron computed (what quantization alone does);
- streamed: teacher-forced token by token through the engine at ``--budget`` (default policy):
  ppl, top-1 agreement with the float32 checkpoint, FFN bytes and requests per token, hit rate;
- decode tokens/s of ``sparseflash run -n 64`` (a fresh process per layout; ratios, noisy machine).
llama.cpp rows (llama-cpp-python, the bench extra): its ppl on the same windows of the f32 export
quantized by its own quantizer to Q8_0 and Q4_0 (skipped, and said so, without the package).

    python bench/bench_quant.py [--tokens 1024] [--budget 25%ffn] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIGS = [("f16", "f16"), ("q8", "f16"), ("q4", "f16"), ("q8", "q8"), ("q4", "q8")]  # (bundles, resident)


def ppl_of(logits: torch.Tensor, seqs: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def decode_speed(layout: Path | None, budget: str) -> float:
    args = ["run", "-n", "64", "--greedy", "--ignore-eos", "--json", "-p", "The os module provides"]
    if layout is not None:
        args += ["-m", str(layout), "--budget", budget]
    proc = subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", *args], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        raise SystemExit(f"bench: run failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)["decode_tokens_per_s"]


def llama_cpp_rows(seqs: torch.Tensor, work: Path) -> list[dict]:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python not installed (pip install -e '.[bench]'): no llama.cpp rows", file=sys.stderr)
        return []
    from gguf_quant_vs_llamacpp import llama_cpp_logits, quantize_with_llama_cpp

    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.gguf_export import export_gguf

    f32 = export_gguf(default_model_dir(), work / "f32.gguf").path
    rows = []
    for ftype in ("F32", "Q8_0", "Q4_0"):
        path = f32 if ftype == "F32" else work / f"{ftype}.gguf"
        if ftype != "F32":
            quantize_with_llama_cpp(llama_cpp, f32, path, ftype)
        logits = torch.from_numpy(np.stack([llama_cpp_logits(llama_cpp, path, w.tolist()) for w in seqs]))
        rows.append({"config": f"llama.cpp {ftype}", "file_bytes": path.stat().st_size, "ppl": ppl_of(logits, seqs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--budget", default="25%ffn")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from sparseflash.eval.io_report import quality, streamed_pass
    from sparseflash.layout.build import build_layout
    from sparseflash.layout.params import LayoutParams
    from sparseflash.layout.pipeline import bundled_texts, prepare_bundled
    from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir
    from sparseflash.model.loader import open_dense
    from sparseflash.model.perplexity import windows
    from sparseflash.model.text import corpus_ids
    from sparseflash.model.transformer import Transformer
    from sparseflash.runtime.layout_model import open_layout

    torch.set_num_threads(1)
    prepared = prepare_bundled(quiet=True, log=lambda m: print(m, file=sys.stderr)).parent
    dense = open_dense(None)
    _, held = bundled_texts()
    ids = corpus_ids(held, dense.tokenizer, 8192 + args.tokens)[8192 : 8192 + args.tokens]
    seqs = windows(ids, args.ctx, args.tokens)
    ref = torch.cat([Transformer(dense.config, dense.weights)(w[None]) for w in seqs])
    work = Path(tempfile.mkdtemp(prefix="sf-bench-quant-"))
    rows = [{"config": "checkpoint f32 (in memory)", "ppl": ppl_of(ref, seqs),
             "decode_tok_s": decode_speed(None, args.budget)}]
    for dtype, resident in CONFIGS:
        path = work / f"{dtype}-{resident}.sflash"
        header = build_layout(dense, prepared / "profile", path, prepared / "predictors",
                              LayoutParams(dtype=dtype, resident_dtype=resident), checkpoint_hash(default_model_dir()),
                              quiet=True)
        lm = open_layout(path, with_ffn=True)
        try:
            exact = torch.cat([Transformer(lm.config, lm.weights)(w[None]) for w in seqs])
            layout_bytes = lm.weight_bytes
        finally:
            lm.close()
        t = time.perf_counter()
        logits, stats, memory, _, _ = streamed_pass(path, args.budget, seqs)
        n = sum(s.tokens for s in stats)
        ppl, top1 = quality(logits, seqs, ref)
        hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
        rows.append({"config": f"{dtype} bundles, {resident} resident", "bundle_bytes": header.bundle_bytes,
                     "layout_bytes": layout_bytes, "resident_bytes": memory.resident, "exact_ppl": ppl_of(exact, seqs),
                     "ppl": ppl, "top1_vs_f32": top1, "ffn_bytes_per_token": sum(s.bytes_read for s in stats) / n,
                     "requests_per_token": sum(s.requests for s in stats) / n, "hit_rate": hits / max(hits + misses, 1),
                     "teacher_forced_s": time.perf_counter() - t, "decode_tok_s": decode_speed(path, args.budget)})
        print(f"{rows[-1]['config']}: done", file=sys.stderr)
    rows += llama_cpp_rows(seqs, work)
    f16 = rows[1]
    print(f"bundled tiny-relu2, {seqs.numel()} held-out tokens, budget {args.budget}; streamed rows teacher-forced "
          "with the default policy; tokens/s from `run -n 64` (one process each, machine shared)")
    print("| config | bundle B | layout MiB | resident MiB | exact ppl | streamed ppl | vs f16 | top-1 vs f32 "
          "| FFN KiB/token | requests/token | hit rate | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mib = lambda k, r=r: f"{r[k] / 2**20:.2f}" if k in r else ""  # noqa: E731
        print(f"| {r['config']} | {r.get('bundle_bytes', '')} | {mib('layout_bytes') or mib('file_bytes')} | "
              f"{mib('resident_bytes')} | {r.get('exact_ppl', float('nan')):.3f} | {r['ppl']:.3f} | "
              f"{(r['ppl'] / f16['ppl'] - 1) * 100:+.2f}% | {r.get('top1_vs_f32', float('nan')):.3f} | "
              f"{r.get('ffn_bytes_per_token', float('nan')) / 1024:.1f} | {r.get('requests_per_token', float('nan')):.1f} "
              f"| {r.get('hit_rate', float('nan')):.1%} | {r.get('decode_tok_s', float('nan')):.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"tokens": int(seqs.numel()), "budget": args.budget, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
