"""Down columns of a quantized GGUF re-quantized along d: the error that adds, on the bundled model.

A GGUF stores ``ffn_down`` (d, neurons) quantized along its rows (blocks of neurons of one output
dimension); sparseflash's layout stores each neuron's down *column* (d values) in its bundle, so a
layout written from a quantized GGUF must dequantize and quantize again along d. Measured here with
GGUF Q8_0 / Q4_0 arithmetic (gguf-py's quantize) in groups of 32 along d, for sources the bundled
model's f32 down projection quantized (a) by gguf-py to Q8_0 and Q4_0, (b) by llama.cpp's quantizer
to Q4_K_M (Q4_K and Q6_K down projections) and Q6_K when llama-cpp-python (bench extra) is installed.

Per source: the source's own error ||S - W|| / ||W||, what re-quantization adds ||R - S|| / ||W||,
the total ||R - W|| / ||W||, and the direct re-quantization of the f32 weights ||Q(W) - W|| / ||W||
(Frobenius norms over all layers). Then heldout perplexity with the down weights replaced.

    python bench/gguf_requant_down.py --out /tmp/gguf_requant_down.json
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def along_d(w: torch.Tensor, kind: str) -> torch.Tensor:
    """(d, neurons) float32 quantized per neuron column in groups of 32 along d, GGUF ``kind`` arithmetic."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[kind]
    cols = w.T.contiguous().numpy()  # (neurons, d): one row per neuron, blocks along d
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(cols, qtype), qtype).T))


def rel(a: list[torch.Tensor], b: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b))
    return (num / sum(float((r.double() ** 2).sum()) for r in ref)) ** 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="heldout tokens for perplexity")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.gguf_export import export_gguf
    from sparseflash.model.gguf_tensors import GGUFTensors
    from sparseflash.model.loader import open_dense
    from sparseflash.model.perplexity import perplexity
    from sparseflash.model.text import read_text
    from sparseflash.model.transformer import Transformer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="sf-requant-"))
    f32 = export_gguf(default_model_dir(), work / "f32.gguf").path
    base = open_dense(f32)
    layers = base.config.num_layers
    w = [base.weights.layers[i].w_down for i in range(layers)]
    ids = base.tokenizer.encode(read_text(default_model_dir() / "heldout.txt.zst"))

    def ppl(downs: list[torch.Tensor]) -> float:
        new = [dataclasses.replace(layer, w_down=d) for layer, d in zip(base.weights.layers, downs)]
        model = Transformer(base.config, dataclasses.replace(base.weights, layers=new))
        return perplexity(model, ids, ctx=256, max_tokens=args.tokens, progress=False).ppl

    sources: dict[str, list[torch.Tensor]] = {}
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    for kind in ("Q8_0", "Q4_0"):  # along the GGUF rows, as a GGUF stores ffn_down
        q = GGMLQuantizationType[kind]
        sources[f"gguf-py {kind}"] = [torch.from_numpy(dequantize(quantize(x.numpy(), q), q)) for x in w]
    types = {}
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: K-quant sources skipped", file=sys.stderr)
        llama_cpp = None
    for ftype in ("Q6_K", "Q4_K_M") if llama_cpp else ():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 1
        path = work / f"{ftype}.gguf"
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {ftype}")
        t = GGUFTensors(path)
        names = [f"blk.{i}.ffn_down.weight" for i in range(layers)]
        types[ftype] = [t.info(n).type_name for n in names]
        sources[f"llama.cpp {ftype}"] = [t.load(n) for n in names]

    rows = []
    base_ppl = ppl(w)
    direct = {k: [along_d(x, k) for x in w] for k in ("Q8_0", "Q4_0")}
    for name, src in sources.items():
        row = {"source": name, "down_types": types.get(name.split()[-1]), "src_err": rel(src, w, w),
               "src_ppl": ppl(src)}
        for k in ("Q8_0", "Q4_0"):
            r = [along_d(x, k) for x in src]
            row[k] = {"added": rel(r, src, w), "total": rel(r, w, w), "direct": rel(direct[k], w, w), "ppl": ppl(r)}
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    print(f"bundled tiny-relu2: ffn_down (256 x 1024) x {layers} layers; perplexity on {args.tokens} heldout tokens "
          f"(ctx 256), f32 {base_ppl:.4f}")
    print("| source (along GGUF rows) | source error | source ppl | + Q8_0 along d: added / total (direct) | ppl "
          "| + Q4_0 along d: added / total (direct) | ppl |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["Q8_0"], r["Q4_0"]
        print(f"| {r['source']} | {r['src_err']:.4f} | {r['src_ppl']:.4f} | {a['added']:.4f} / {a['total']:.4f} "
              f"({a['direct']:.4f}) | {a['ppl']:.4f} | {b['added']:.4f} / {b['total']:.4f} ({b['direct']:.4f}) "
              f"| {b['ppl']:.4f} |")
    if types:
        print("llama.cpp down types per layer: " + "; ".join(f"{k}: {v}" for k, v in types.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"f32_ppl": base_ppl, "tokens": args.tokens, "rows": rows,
                                              "down_types": types}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
