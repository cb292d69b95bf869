"""Quantized GGUFs in sparseflash vs llama.cpp: logits on the same tokens, side by side per quantization.

The bundled model is exported to an f32 GGUF, quantized by llama.cpp's own quantizer
(``llama_model_quantize`` of llama-cpp-python, the bench extra) to each ``--ftypes``, and each file
is run by llama.cpp (f32 KV cache, all-position logits) and by sparseflash's dense engine (the
file's tensors dequantized to float32 by gguf-py). Printed per file: tensor types, max and mean
|logit difference|, top-1 agreement, and the same figures of the quantized model against the f32
one (what the quantization itself moves). Without llama-cpp-python it says so and exits 0.

    python bench/gguf_quant_vs_llamacpp.py --out /tmp/gguf_quant_vs_llamacpp.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def quantize_with_llama_cpp(llama_cpp, src: Path, dst: Path, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")


def llama_cpp_logits(llama_cpp, path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32 KV cache
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a - b)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ftypes", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="write every figure to this JSON file")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'); skipping")
        return 0
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.gguf_export import export_gguf
    from sparseflash.model.gguf_tensors import GGUFTensors
    from sparseflash.model.loader import open_dense
    from sparseflash.model.text import read_text

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="sf-gguf-quant-"))
    f32 = export_gguf(default_model_dir(), work / "f32.gguf").path
    base = open_dense(f32)
    tokens = base.tokenizer.encode(read_text(default_model_dir() / "heldout.txt.zst"))[: args.tokens]
    ref = base.transformer()(torch.tensor([tokens]))[0].numpy()
    rows = [{"ftype": "F32", "types": GGUFTensors(f32).type_counts(), "bytes": f32.stat().st_size,
             "vs_llama_cpp": compare(ref, llama_cpp_logits(llama_cpp, f32, tokens)), "vs_f32": compare(ref, ref)}]
    for ftype in args.ftypes.split(","):
        path = work / f"{ftype}.gguf"
        t = time.perf_counter()
        quantize_with_llama_cpp(llama_cpp, f32, path, ftype)
        model = open_dense(path)
        ours = model.transformer()(torch.tensor([tokens]))[0].numpy()
        rows.append({"ftype": ftype, "types": GGUFTensors(path).type_counts(), "bytes": path.stat().st_size,
                     "vs_llama_cpp": compare(ours, llama_cpp_logits(llama_cpp, path, tokens)),
                     "vs_f32": compare(ours, ref), "seconds": time.perf_counter() - t})
        print(f"{ftype}: done", file=sys.stderr)
    scale = float(np.abs(ref).max())
    print(f"bundled tiny-relu2, {len(tokens)} tokens of heldout text, logit scale (max |f32 logit|) {scale:.1f}")
    print("| file | tensor types | MiB | vs llama.cpp: max / mean abs, top-1 | vs f32 model: max / mean abs, top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        a, b = r["vs_llama_cpp"], r["vs_f32"]
        types = ", ".join(f"{n} {k}" for k, n in r["types"].items())
        print(f"| {r['ftype']} | {types} | {r['bytes'] / 2**20:.1f} | {a['max_abs']:.2e} / {a['mean_abs']:.2e}, "
              f"{a['top1_agree']:.1%} | {b['max_abs']:.2e} / {b['mean_abs']:.2e}, {b['top1_agree']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"tokens": len(tokens), "logit_scale": scale, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
