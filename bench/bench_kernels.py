"""Benchmark the sparse FFN back ends against a dense torch matvec, batch 1, one FFN layer.

    python bench/bench_kernels.py            # 1B, 7B, 13B shapes x 2..100% active, f16, relu2
    python bench/bench_kernels.py --quick    # 7B shape at 10% and 100% only
    python bench/bench_kernels.py --gated --dtype bf16 --json

Active sets are uniform random subsets of the neurons, a fresh one for every repeat (so the
bundles read are not already in the CPU caches), and the random weights make every active
neuron fire (a != 0), so each active bundle is read in full. The dense baseline is torch
x @ W_up.T -> act -> @ W_down.T on full weights in the same storage dtype as the bundles
(torch does f16/bf16 matvec on CPU), using all cores. Each back end runs back to back,
next to the dense runs for the same share; times are medians after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.kernels import dense_ffn, get_backend
from sparseflash.kernels.cuda import is_available as cuda_is_available
from sparseflash.kernels.synthetic import SyntheticLayer, random_active_set, random_layer

SHAPES = {"1b": (2048, 8192), "7b": (4096, 11008), "13b": (5120, 13824)}  # name -> (d, n)
SHARES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
WARMUP = 2  # untimed calls per (share, back end)
REFERENCE_REPEATS = 3  # the numpy reference is slow and has nothing to warm up
SETTLE_S = 2.0  # pause after building a layer: timings right after its ~1 GB of allocations ran slow


def call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call in milliseconds."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def read_bandwidth_gbps() -> float:
    """Memory read bandwidth in GB/s: torch sum over 1 GiB of float32, all threads, best of 5."""
    big = torch.ones(1 << 28, dtype=torch.float32)
    ms = min(call_ms(big.sum) for _ in range(6))
    return big.numel() * 4 / ms / 1e6


def dense_call(layer: SyntheticLayer, storage: str) -> tuple[Callable[[], object], int]:
    """(call, weight bytes) for the dense torch FFN on full weights in the storage dtype."""
    dtype = TORCH_DTYPE[storage]
    w_up, w_down = torch.from_numpy(layer.w_up).to(dtype), torch.from_numpy(layer.w_down).to(dtype)
    w_gate = None if layer.w_gate is None else torch.from_numpy(layer.w_gate).to(dtype)
    x = torch.from_numpy(np.abs(np.random.default_rng(0).standard_normal((1, layer.d), dtype=np.float32)))
    x = x.to(dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in (w_up, w_down, w_gate) if w is not None)
    return (lambda: dense_ffn(x, w_up, w_down, layer.kind, w_gate=w_gate)), weight_bytes


def sparse_call(backend: str, layer: SyntheticLayer) -> Callable[[np.ndarray], object]:
    """call(active_slots) for one back end, batch 1."""
    sparse_ffn = get_backend(backend).sparse_ffn
    bundles = layer.bundles
    if backend == "cuda":  # the runtime keeps the neuron cache on the device
        from numba import cuda

        bundles = cuda.to_device(bundles)
    x = np.abs(np.random.default_rng(0).standard_normal((1, layer.d), dtype=np.float32))
    return lambda slots: sparse_ffn(x, bundles, slots, layer.kind, storage=layer.storage)


def measure_shape(layer: SyntheticLayer, args: argparse.Namespace, backends: list[str], progress: tqdm):
    """Times in ms: (dense samples, {(share, backend): samples}, dense weight bytes).

    For each share, the dense baseline and then each back end run back to back (WARMUP
    untimed calls, then args.repeats timed ones); the dense samples of all shares are pooled,
    so dense and sparse timings are taken close together. Each sparse call gets a fresh
    random active set. The reference compiles nothing, is timed on REFERENCE_REPEATS calls,
    and runs after all the others.
    """
    dense, dense_bytes = dense_call(layer, args.dtype)
    sparse = {name: sparse_call(name, layer) for name in backends}
    # the reference goes last: its big numpy temporaries slowed the next kernel timings by ~40%
    fast = [name for name in backends if name != "reference"]
    rounds = [(share, fast, True) for share in args.shares]
    if "reference" in backends:
        rounds += [(share, ["reference"], False) for share in args.shares]
    dense_ms, sparse_ms = [], {}
    for share, names, with_dense in rounds:
        if with_dense:
            dense_ms += [call_ms(dense) for _ in range(WARMUP + args.repeats)][WARMUP:]
        for name in names:
            warmup, repeats = (0, REFERENCE_REPEATS) if name == "reference" else (WARMUP, args.repeats)
            slots = [random_active_set(layer.n, share, seed=i) for i in range(warmup + repeats)]
            times = [call_ms(functools.partial(sparse[name], s)) for s in slots]
            sparse_ms[(share, name)] = times[warmup:]
        progress.update()
    return dense_ms, sparse_ms, dense_bytes


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (shape, share, back end); returns one row per measurement (medians)."""
    kind = "relu2glu" if args.gated else "relu2"
    backends = [b for b in args.backends if b != "cuda" or cuda_is_available()]
    for name in backends:
        get_backend(name).warmup(**({"storages": (args.dtype,)} if name in ("cpu", "cuda") else {}))
    rows = []
    passes = 2 if "reference" in backends and len(backends) > 1 else 1
    with tqdm(total=len(args.shapes) * len(args.shares) * passes, file=sys.stderr, desc="bench", leave=False) as progress:
        for shape in args.shapes:
            d, n = SHAPES[shape]
            layer = random_layer(d, n, kind, args.dtype, all_firing=True, seed=1)
            time.sleep(SETTLE_S)
            dense_ms, sparse_ms, dense_bytes = measure_shape(layer, args, backends, progress)
            dense_median = statistics.median(dense_ms)
            base = {"shape": shape, "d": d, "n": n, "kind": kind, "storage": args.dtype}
            rows.append({**base, "active_share": 1.0, "active_neurons": n, "backend": "dense",
                         "ms": dense_median, "gbps": dense_bytes / dense_median / 1e6,
                         "speedup_vs_dense": 1.0, "ideal_speedup": 1.0})
            for (share, name), times in sorted(sparse_ms.items(), key=lambda kv: (kv[0][0], backends.index(kv[0][1]))):
                k, ms = int(round(share * n)), statistics.median(times)
                rows.append({**base, "active_share": share, "active_neurons": k, "backend": name, "ms": ms,
                             "gbps": k * layer.bundles.shape[1] * layer.bundles.itemsize / ms / 1e6,
                             "speedup_vs_dense": dense_median / ms, "ideal_speedup": 1.0 / share})
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, bandwidth: float) -> None:
    """One table: time, GB/s of bundle (dense: weight) bytes read, speed-up vs dense and ideal."""
    print(f"# sparse FFN kernels, batch 1, kind {rows[0]['kind']}, storage {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"# dense = torch matvec on full weights in {args.dtype}; active sets: fresh uniform random "
          f"subsets; memory read bandwidth (torch sum, 1 GiB): {bandwidth:.1f} GB/s")
    header = f"{'shape':>5} {'active':>6} {'neurons':>7} {'backend':>9} {'ms':>9} {'GB/s':>6} " \
             f"{'vs dense':>8} {'ideal':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:>5} {r['active_share']:>6.0%} {r['active_neurons']:>7} {r['backend']:>9} "
              f"{r['ms']:>9.3f} {r['gbps']:>6.1f} {r['speedup_vs_dense']:>7.1f}x {r['ideal_speedup']:>5.0f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("f16", "bf16", "f32"), default="f16", help="bundle storage")
    parser.add_argument("--gated", action="store_true", help="gated FFN (relu2glu) instead of relu2")
    parser.add_argument("--quick", action="store_true", help="7B shape at 10%% and 100%% only")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per (shape, share) (median)")
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu", "cuda"],
                        choices=("reference", "cpu", "cuda"), help="sparse back ends (cuda only if present)")
    args = parser.parse_args(argv)
    args.shapes = ["7b"] if args.quick else list(SHAPES)
    args.shares = (0.1, 1.0) if args.quick else SHARES
    if cuda_is_available() and "cuda" in args.backends:
        from numba import config

        if config.ENABLE_CUDASIM:  # the simulator is far too slow to time
            args.backends = [b for b in args.backends if b != "cuda"]
    bandwidth = read_bandwidth_gbps()
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, args, bandwidth)


if __name__ == "__main__":
    main()
