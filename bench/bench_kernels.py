"""Benchmark the sparse FFN back ends against a dense torch matvec, batch 1, one FFN layer.

    python bench/bench_kernels.py            # 1B, 7B, 13B shapes x 2..100% active, f16, relu2
    python bench/bench_kernels.py --quick    # 7B shape at 10% and 100% only
    python bench/bench_kernels.py --gated --dtype bf16 --json
    python bench/bench_kernels.py --shapes 7b --dtype f16 q8 q4 --backends cpu --linear   # quantized rows
    python bench/bench_kernels.py --quality  # q8 / q4 / q4 with min round-trip error on the bundled model

Active sets are uniform random subsets of the neurons, a fresh one for every repeat (so the
bundles read are not already in the CPU caches), and the random weights make every active
neuron fire (a != 0), so each active bundle is read in full. The dense baseline is torch
x @ W_up.T -> act -> @ W_down.T on full weights in the storage dtype of the bundles (f16 for
q8 / q4: torch has no quantized CPU matvec), using all cores. With several --dtype values the
layer's float32 weights are packed once per storage and every storage runs in the same pass,
next to the dense runs for the same share; times are medians after a warm-up. GB/s counts the
bundle bytes the kernel reads (active neurons x bundle_nbytes), so q4 moves fewer bytes per
neuron than f16 for the same work. --linear adds x @ W.T for a 4096 x 4096 matrix:
quant_linear (q8, q4) next to torch f32 and f16 matmuls.

--threads times the host kernel on one thread and split across the cores, side by side, at sizes
around the split rule (kernels/cpu.py: _MIN_WORK_PER_THREAD), and prints which the rule picks.

--clock cpu times the CPU time of the calling thread (time.thread_time) instead of wall time,
with every kernel and torch on that one thread: on a machine shared with other busy processes
the wall time mostly measures time slicing, the thread's CPU time (memory stalls included)
still measures the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.kernels import QUANT_STORAGES, dense_ffn, get_backend, pack_bundles, quantize
from sparseflash.kernels.cuda import is_available as cuda_is_available
from sparseflash.kernels.synthetic import SyntheticLayer, random_active_set, random_layer

SHAPES = {"1b": (2048, 8192), "7b": (4096, 11008), "13b": (5120, 13824)}  # name -> (d, n)
SHARES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
STORAGE_CHOICES = ("f16", "bf16", "f32", "q8", "q4")
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
WARMUP = 2  # untimed calls per (share, back end)
REFERENCE_REPEATS = 3  # the numpy reference is slow and has nothing to warm up
SETTLE_S = 2.0  # pause after building a layer: timings right after its ~1 GB of allocations ran slow
LINEAR_SHAPE = (4096, 4096)  # (rows, k) of the --linear matrix, e.g. a 7B attention projection
MODEL = pathlib.Path(__file__).parents[1] / "sparseflash" / "models" / "tiny-relu2" / "model.safetensors"


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def call_ms(fn: Callable[[], object]) -> float:
    """Time of one call in milliseconds (wall, or the calling thread's CPU time with --clock cpu)."""
    start = CLOCK()
    fn()
    return 1e3 * (CLOCK() - start)


def read_bandwidth_gbps() -> float:
    """Memory read bandwidth in GB/s: torch sum over 1 GiB of float32, all threads, best of 5."""
    big = torch.ones(1 << 28, dtype=torch.float32)
    ms = min(call_ms(big.sum) for _ in range(6))
    return big.numel() * 4 / ms / 1e6


def dense_storage(storages: list[str]) -> str:
    """Storage of the dense baseline: the first float storage asked for, else f16."""
    return next((s for s in storages if s not in QUANT_STORAGES), "f16")


def gpu_bandwidth_gbps() -> float:
    """GPU memory read bandwidth in GB/s: torch sum over 1 GiB of float32 on the device, best of 5."""
    big = torch.ones(1 << 28, dtype=torch.float32, device="cuda")
    ms = min(call_ms(lambda: (big.sum(), torch.cuda.synchronize())) for _ in range(6))
    return big.numel() * 4 / ms / 1e6


def dense_call(layer: SyntheticLayer, storage: str, device: str = "cpu") -> tuple[Callable[[], object], int]:
    """(call, weight bytes) for the dense torch FFN on full weights in the storage dtype, on ``device``
    (on cuda the call waits for the GPU)."""
    dtype = TORCH_DTYPE[storage]
    w_up, w_down = (torch.from_numpy(w).to(device=device, dtype=dtype) for w in (layer.w_up, layer.w_down))
    w_gate = None if layer.w_gate is None else torch.from_numpy(layer.w_gate).to(device=device, dtype=dtype)
    x = torch.from_numpy(np.abs(np.random.default_rng(0).standard_normal((1, layer.d), dtype=np.float32)))
    x = x.to(device=device, dtype=dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in (w_up, w_down, w_gate) if w is not None)
    if device == "cuda":
        return (lambda: (dense_ffn(x, w_up, w_down, layer.kind, w_gate=w_gate), torch.cuda.synchronize())), weight_bytes
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


def gpu_dense(backends: list[str]) -> bool:
    """Whether a dense torch baseline on the GPU runs next to the cuda back end (a real GPU only)."""
    return "cuda" in backends and torch.cuda.is_available()


def measure_shape(layers: dict[str, SyntheticLayer], args: argparse.Namespace, backends: list[str], progress: tqdm):
    """Times in ms: (dense samples, {(share, storage, backend): samples}, dense weight bytes).

    For each share, the dense baseline and then each storage x back end run back to back
    (WARMUP untimed calls, then args.repeats timed ones); the dense samples of all shares are
    pooled, so dense and sparse timings are taken close together. Each sparse call gets a fresh
    random active set. The reference compiles nothing, is timed on REFERENCE_REPEATS calls,
    and runs after all the others.
    """
    first = next(iter(layers.values()))
    dense, dense_bytes = dense_call(first, dense_storage(list(layers)))
    dense_gpu = dense_call(first, dense_storage(list(layers)), "cuda")[0] if gpu_dense(backends) else None
    sparse = {(storage, name): sparse_call(name, layer) for storage, layer in layers.items() for name in backends}
    # the reference goes last: its big numpy temporaries slowed the next kernel timings by ~40%
    fast = [(s, name) for s in layers for name in backends if name != "reference"]
    rounds = [(share, fast, True) for share in args.shares]
    if "reference" in backends:
        rounds += [(share, [(s, "reference") for s in layers], False) for share in args.shares]
    dense_ms, sparse_ms = [], {}
    for share, runs, with_dense in rounds:
        if with_dense:
            dense_ms += [call_ms(dense) for _ in range(WARMUP + args.repeats)][WARMUP:]
            if dense_gpu is not None:
                sparse_ms.setdefault((1.0, "dense", "dense-cuda"), []).extend(
                    [call_ms(dense_gpu) for _ in range(WARMUP + args.repeats)][WARMUP:])
        for storage, name in runs:
            warmup, repeats = (0, REFERENCE_REPEATS) if name == "reference" else (WARMUP, args.repeats)
            slots = [random_active_set(first.n, share, seed=i) for i in range(warmup + repeats)]
            times = [call_ms(functools.partial(sparse[(storage, name)], s)) for s in slots]
            sparse_ms[(share, storage, name)] = times[warmup:]
        progress.update()
    return dense_ms, sparse_ms, dense_bytes


def build_layers(d: int, n: int, kind: str, storages: list[str]) -> dict[str, SyntheticLayer]:
    """One random layer (every active neuron fires), its float32 weights packed in each storage."""
    base = random_layer(d, n, kind, storages[0], all_firing=True, seed=1)
    layers = {storages[0]: base}
    for storage in storages[1:]:
        bundles = pack_bundles(base.w_up, base.w_down, base.w_gate, dtype=storage)
        layers[storage] = dataclasses.replace(base, storage=storage, bundles=bundles)
    return layers


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every (shape, share, storage, back end); returns one row per measurement (medians)."""
    kind = "relu2glu" if args.gated else "relu2"
    backends = [b for b in args.backends if b != "cuda" or cuda_is_available()]
    for name in backends:
        get_backend(name).warmup(**({"storages": tuple(args.dtype)} if name in ("cpu", "cuda") else {}))
    rows = []
    passes = 2 if "reference" in backends and len(backends) > 1 else 1
    with tqdm(total=len(args.shapes) * len(args.shares) * passes, file=sys.stderr, desc="bench", leave=False) as progress:
        for shape in args.shapes:
            d, n = SHAPES[shape]
            layers = build_layers(d, n, kind, args.dtype)
            time.sleep(SETTLE_S)
            dense_ms, sparse_ms, dense_bytes = measure_shape(layers, args, backends, progress)
            dense_median = statistics.median(dense_ms)
            base = {"shape": shape, "d": d, "n": n, "kind": kind}
            rows.append({**base, "storage": dense_storage(args.dtype), "active_share": 1.0, "active_neurons": n,
                         "backend": "dense", "ms": dense_median, "bundle_bytes": dense_bytes // n,
                         "gbps": dense_bytes / dense_median / 1e6, "speedup_vs_dense": 1.0, "ideal_speedup": 1.0})
            gpu_median = statistics.median(sparse_ms.pop((1.0, "dense", "dense-cuda"), [float("nan")]))
            if gpu_dense(backends):
                rows.append({**rows[-1], "backend": "dense-cuda", "ms": gpu_median,
                             "gbps": dense_bytes / gpu_median / 1e6, "gpu_read_gbps": gpu_bandwidth_gbps()})
            order = {(s, b): i for i, (s, b) in enumerate((s, b) for s in args.dtype for b in backends)}
            for (share, storage, name), times in sorted(sparse_ms.items(),
                                                        key=lambda kv: (kv[0][0], order[kv[0][1:]])):
                k, ms = int(round(share * n)), statistics.median(times)
                bundle_bytes = layers[storage].bundles.shape[1] * layers[storage].bundles.itemsize
                same_device = gpu_median if name == "cuda" and gpu_dense(backends) else dense_median
                rows.append({**base, "storage": storage, "active_share": share, "active_neurons": k, "backend": name,
                             "ms": ms, "bundle_bytes": bundle_bytes, "gbps": k * bundle_bytes / ms / 1e6,
                             "speedup_vs_dense": same_device / ms, "ideal_speedup": 1.0 / share})
            del layers
    return rows


def run_linear(args: argparse.Namespace) -> list[dict]:
    """x (1, k) @ W.T for W (rows, k): quant_linear q8 / q4 (cpu) next to torch f32 / f16 matmuls."""
    rows_n, k = LINEAR_SHAPE
    w = np.random.default_rng(2).standard_normal(LINEAR_SHAPE, dtype=np.float32) / np.sqrt(k)
    x = np.random.default_rng(3).standard_normal((1, k), dtype=np.float32)
    cpu = get_backend("cpu")
    calls = {}
    for storage in ("f32", "f16"):
        w_t, x_t = torch.from_numpy(w).to(TORCH_DTYPE[storage]), torch.from_numpy(x).to(TORCH_DTYPE[storage])
        calls[(storage, "torch")] = (functools.partial(torch.matmul, x_t, w_t.T), w_t.numel() * w_t.element_size())
    for storage in ("q8", "q4"):
        w_q = quantize(w, storage)
        calls[(storage, "cpu")] = (functools.partial(cpu.quant_linear, x, w_q, storage), w_q.nbytes)
    cpu.warmup(("q8", "q4"))
    times = {key: [] for key in calls}
    for _ in range(WARMUP + args.repeats):  # interleaved, so every variant sees the same machine
        for key, (fn, _) in calls.items():
            times[key].append(call_ms(fn))
    f32_ms = statistics.median(times[("f32", "torch")][WARMUP:])
    out = []
    for (storage, name), (_, nbytes) in calls.items():
        ms = statistics.median(times[(storage, name)][WARMUP:])
        out.append({"shape": f"{rows_n}x{k}", "storage": storage, "backend": name, "ms": ms, "weight_bytes": nbytes,
                    "gbps": nbytes / ms / 1e6, "speedup_vs_f32": f32_ms / ms})
    return out


def quality() -> list[dict]:
    """Round-trip error ||W - deq(q(W))|| / ||W|| of the bundled model's FFN parts, per layer and storage.

    Up rows and down columns are quantized along d, as in a bundle. q4_1 (Q4_1: a scale and a
    minimum per group, 20 bytes per 32 values) comes from gguf-py for comparison.
    """
    import gguf
    from safetensors.numpy import load_file

    from sparseflash.kernels import dequantize

    def q4_1(w: np.ndarray) -> np.ndarray:
        q = gguf.GGMLQuantizationType.Q4_1
        return gguf.quants.dequantize(gguf.quants.quantize(w, q), q)

    codecs = {"q8": lambda w: dequantize(quantize(w, "q8"), "q8"),
              "q4": lambda w: dequantize(quantize(w, "q4"), "q4"), "q4_1": q4_1}
    weights = load_file(MODEL)
    rows = []
    for layer in range(len([k for k in weights if k.endswith("mlp.up_proj.weight")])):
        parts = {"up": weights[f"model.layers.{layer}.mlp.up_proj.weight"].astype(np.float32),  # (n, d)
                 "down": weights[f"model.layers.{layer}.mlp.down_proj.weight"].astype(np.float32).T}  # (n, d)
        for part, w in parts.items():
            for storage, codec in codecs.items():
                error = float(np.linalg.norm(codec(w) - w) / np.linalg.norm(w))
                rows.append({"layer": layer, "part": part, "storage": storage, "rel_error": error})
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, bandwidth: float) -> None:
    """One table: time, GB/s of bundle (dense: weight) bytes read, speed-up vs dense and ideal."""
    print(f"# sparse FFN kernels, batch 1, kind {rows[0]['kind']}, storage {' '.join(args.dtype)}, "
          f"{torch.get_num_threads()} threads, {args.clock} time")
    print(f"# dense = torch matvec on full weights in {dense_storage(args.dtype)}; active sets: fresh uniform "
          f"random subsets; memory read bandwidth (torch sum, 1 GiB): {bandwidth:.1f} GB/s")
    gpu = [r for r in rows if r["backend"] == "dense-cuda"]
    if gpu:
        print(f"# dense-cuda = the same on the GPU ({torch.cuda.get_device_name()}; GPU memory read bandwidth, torch "
              f"sum over 1 GiB: {gpu[0]['gpu_read_gbps']:.0f} GB/s); cuda rows: 'vs dense' is vs dense-cuda, and "
              "each call includes copying x in and y out")
    header = f"{'shape':>5} {'active':>6} {'neurons':>7} {'storage':>7} {'B/neuron':>8} {'backend':>10} {'ms':>9} " \
             f"{'GB/s':>6} {'vs dense':>8} {'ideal':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:>5} {r['active_share']:>6.0%} {r['active_neurons']:>7} {r['storage']:>7} "
              f"{r['bundle_bytes']:>8} {r['backend']:>10} {r['ms']:>9.3f} {r['gbps']:>6.1f} "
              f"{r['speedup_vs_dense']:>7.1f}x {r['ideal_speedup']:>5.0f}x")


def print_linear(rows: list[dict], args: argparse.Namespace) -> None:
    """quant_linear vs torch: time, GB/s of weight bytes, speed-up vs torch f32."""
    print(f"# x (1, k) @ W.T, W {rows[0]['shape']}: quant_linear (cpu) vs torch matmul, "
          f"{torch.get_num_threads()} threads, {args.clock} time")
    header = f"{'storage':>7} {'backend':>7} {'MB':>6} {'ms':>8} {'GB/s':>6} {'vs f32':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['storage']:>7} {r['backend']:>7} {r['weight_bytes'] / 1e6:>6.1f} {r['ms']:>8.3f} "
              f"{r['gbps']:>6.1f} {r['speedup_vs_f32']:>6.2f}x")


def print_quality(rows: list[dict]) -> None:
    """Relative round-trip error per layer and part, one column per storage."""
    storages = list(dict.fromkeys(r["storage"] for r in rows))
    print("# ||W - deq(q(W))|| / ||W||, bundled tiny-relu2 FFN weights (d = 256), quantized along d")
    print(f"{'layer':>5} {'part':>5} " + " ".join(f"{s:>7}" for s in storages))
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["layer"], r["part"]), {})[r["storage"]] = r["rel_error"]
    for (layer, part), errors in cells.items():
        print(f"{layer:>5} {part:>5} " + " ".join(f"{errors[s]:>7.4f}" for s in storages))


THREAD_SIZES = ((256, (64, 256)), (1024, (128, 512)), (2048, (128, 512, 2048)), (4096, (256, 512, 2048)))


def threads_split(repeats: int) -> list[dict]:
    """Per (d, active neurons): the host kernel's median us on one thread and split across the cores."""
    from sparseflash.kernels import cpu

    rows, keep = [], cpu._MIN_WORK_PER_THREAD
    try:
        for d, ks in THREAD_SIZES:
            n = max(ks)
            bundles = (np.random.default_rng(0).standard_normal((n, 2 * d), dtype=np.float32) * 0.05).astype(np.float16)
            x = np.random.default_rng(1).standard_normal((1, d), dtype=np.float32)
            for k in ks:
                slots = np.sort(np.random.default_rng(k).choice(n, k, replace=False))
                row = {"d": d, "active": k, "elements": k * 2 * d}
                for name, work in (("one_thread_us", 1 << 62), ("split_us", 1)):
                    cpu._MIN_WORK_PER_THREAD = work
                    fn = functools.partial(cpu.sparse_ffn, x, bundles, slots, "relu2", storage="f16")
                    for _ in range(WARMUP):
                        fn()
                    row[name] = statistics.median(call_ms(fn) for _ in range(repeats)) * 1e3
                cpu._MIN_WORK_PER_THREAD = keep
                row["rule_threads"] = cpu.thread_count(k, 2 * d)
                rows.append(row)
    finally:
        cpu._MIN_WORK_PER_THREAD = keep
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=STORAGE_CHOICES, default=["f16"],
                        help="bundle storage(s), measured side by side")
    parser.add_argument("--gated", action="store_true", help="gated FFN (relu2glu) instead of relu2")
    parser.add_argument("--quick", action="store_true", help="7B shape at 10%% and 100%% only")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="layer shapes (default: all)")
    parser.add_argument("--linear", action="store_true", help="also time quant_linear on a 4096 x 4096 matrix")
    parser.add_argument("--quality", action="store_true", help="only print q8 / q4 round-trip errors on the "
                        "bundled model's FFN weights")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (all cores), or the CPU time of one thread doing everything")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per (shape, share) (median)")
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu", "cuda"],
                        choices=("reference", "cpu", "cuda"), help="sparse back ends (cuda only if present)")
    parser.add_argument("--threads", action="store_true", help="only time the host kernel on one thread vs split "
                        "across the cores, at sizes around the split rule")
    args = parser.parse_args(argv)
    if args.threads:
        rows = threads_split(max(args.repeats, 50))
        print(json.dumps(rows, indent=1) if args.json else "\n".join(
            f"d={r['d']:>5} active={r['active']:>5} elements={r['elements']:>8}: one thread {r['one_thread_us']:7.1f} us, "
            f"split {r['split_us']:7.1f} us; the rule uses {r['rule_threads']}" for r in rows))
        return
    if args.quality:
        rows = quality()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print_quality(rows)
        return
    if args.clock == "cpu":
        global CLOCK
        import numba

        CLOCK = time.thread_time
        torch.set_num_threads(1)
        numba.config.NUMBA_NUM_THREADS = 1  # the cpu back end's thread count (it reads this on every call)
        args.backends = [b for b in args.backends if b != "cuda"]
    args.shapes = args.shapes or (["7b"] if args.quick else list(SHAPES))
    args.shares = (0.1, 1.0) if args.quick else SHARES
    if cuda_is_available() and "cuda" in args.backends:
        from numba import config

        if config.ENABLE_CUDASIM:  # the simulator is far too slow to time
            args.backends = [b for b in args.backends if b != "cuda"]
    bandwidth = read_bandwidth_gbps()
    rows = run(args)
    linear = run_linear(args) if args.linear else []
    if args.json:  # one list: the sparse rows, then the quant_linear rows (those have "bench": "quant_linear")
        print(json.dumps(rows + [{**r, "bench": "quant_linear"} for r in linear], indent=1))
        return
    print_table(rows, args, bandwidth)
    if linear:
        print()
        print_linear(linear, args)


if __name__ == "__main__":
    main()
