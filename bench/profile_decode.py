"""Where one decoded token's time goes in the streamed engine: the timeline's parts (attention,
prediction, I/O wait, compute, bookkeeping, head) per token and per layer, next to dense in-memory
decoding of the same model, and the Python functions that cost the most (cProfile).

    python bench/profile_decode.py [--layout F.sflash] [--budget 25%ffn] [--strategy all] [--io-threads N] [-n 64] [--top 25]
        [--warm 4] [--no-verify] [--no-dense] [--json F]

Without --layout it uses (and, the first time, prepares) the bundled model's cached layout and
compares with the bundled model decoding densely in memory; with --layout there is no dense row (a
model larger than memory cannot run densely). The decode rows exclude the prompt step. cProfile slows
Python code, so its table is run separately from the timed one; read its shares, not its seconds.
The us/layer column is what does or does not grow with depth: compare layouts of 22 and 32 layers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys

import numpy as np
import torch

from sparseflash.model.generate import Sampling, generate
from sparseflash.runtime.session import open_streamed, stream_generate

PROMPT = "The os module provides a portable way of using operating system dependent functionality."
PARTS = ("attention_s", "predict_s", "io_wait_s", "compute_s", "other_s")


def default_layout() -> str:
    from sparseflash.layout.pipeline import prepared_layout

    return str(prepared_layout(None))


def dense_decode_s(layout_path: str, n: int) -> float:
    """Seconds per decoded token of the bundled model (the default layout's source) dense in memory."""
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.loader import open_dense

    model = open_dense(default_model_dir())
    from sparseflash.model.transformer import Transformer

    net = Transformer(model.config, model.weights)
    ids = model.tokenizer.encode(PROMPT)
    generate(net, ids, 4, Sampling(greedy=True), stop_at_eos=False)
    r = generate(net, ids, n, Sampling(greedy=True), stop_at_eos=False)
    return r.decode_s / max(len(r.tokens) - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default=None)
    ap.add_argument("--budget", default="25%ffn")
    ap.add_argument("--strategy", default=None, help="topk, threshold or all (default: the layout's)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense in-memory row (bundled model)")
    ap.add_argument("--io-threads", type=int, default=None, help="reads in flight (default: planned from the disk)")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--no-verify", action="store_true", help="do not check bundles as they are read (run --no-verify)")
    ap.add_argument("--warm", type=int, default=4, help="tokens decoded untimed first (compiles the kernels; "
                    "with many, the cache fills: 100%%ffn --warm 64 times a run that reads nothing)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    path = a.layout or default_layout()
    kw = {k: v for k, v in (("strategy", a.strategy), ("io_threads", a.io_threads)) if v is not None}
    if a.no_verify:
        kw["verify"] = False
    model = open_streamed(path, a.budget, **kw)
    try:
        ids = model.tokenizer.encode(PROMPT)
        stream_generate(model, ids, a.warm, Sampling(greedy=True), stop_at_eos=False)  # warm the kernels (and cache)
        _, summary = stream_generate(model, ids, a.n, Sampling(greedy=True), stop_at_eos=False)
        stats = model.engine.stats[1:]
        rows = np.array([s.timeline for s in stats])  # (tokens, layers, fields)
        per_token = {p: float(rows[:, :, i].sum(axis=1).mean()) for i, p in enumerate(PARTS)}
        per_token["head_s"] = float(np.mean([s.head_s for s in stats]))
        step = float(np.mean([s.token_s for s in stats]))
        per_layer = {p: rows[:, :, i].mean(axis=0).tolist() for i, p in enumerate(PARTS)}
        prof = cProfile.Profile()
        prof.enable()
        stream_generate(model, ids, a.n, Sampling(greedy=True), stop_at_eos=False)
        prof.disable()
    finally:
        model.close()
    dense = dense_decode_s(path, a.n) if a.layout is None and not a.no_dense else None
    layers = rows.shape[1]
    print(f"{os.path.basename(path)} at {a.budget}, strategy {model.engine.strategy}, {a.n} tokens, {layers} layers, "
          f"{model.engine.fetcher.reader.threads} reads in flight; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'part':<12}{'ms/token':>10}{'share':>8}{'us/layer':>10}")
    for p, v in per_token.items():
        print(f"{p:<12}{v * 1e3:>10.3f}{v / step:>8.1%}{v / layers * 1e6:>10.1f}")
    versus = f"; dense in memory {1 / dense:.1f} tok/s; ratio {dense / step:.2f}x" if dense else ""
    print(f"{'step':<12}{step * 1e3:>10.3f}  (streamed decode {1 / step:.2f} tok/s{versus})")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(a.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-6000:])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layout": path, "budget": a.budget, "tokens": a.n, "per_token_s": per_token, "step_s": step,
                       "per_layer_s": per_layer, "dense_step_s": dense, "summary": summary, "layers": layers,
                       "strategy": model.engine.strategy, "io_threads": model.engine.fetcher.reader.threads,
                       "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
