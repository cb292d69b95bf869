"""Streamed vs in-memory generation of one model: tokens/s, FFN bytes read, peak RSS against budget.

Each configuration runs in its own subprocess (`sparseflash run --json`), so peak RSS is per
configuration. The layout is the bundled model's (prepared on first use) unless --layout is given.

    python bench/bench_stream.py [--layout MODEL.sflash --checkpoint DIR] [-n 64] [--budgets 25%ffn,50%ffn,100%ffn]
                                 [--devices cpu,cuda] [--verify both]

``--verify both`` runs every budget with and without the per-read bundle check (`run --no-verify`)
and prints the check's own throughput (digest + finite check, GB/s) over the layout's bundles.

With ``--devices cpu,cuda`` (on a machine with a GPU) every budget runs on both, side by side; the
dense row is the in-memory CPU run.

``--variant NAME=ARGS`` runs every budget again with extra ``sparseflash run`` arguments, side by
side (e.g. ``--variant 'strict=--lookahead-raise 2' --variant 'ahead=--lookahead'``).

``--repeat R`` (default 3) runs every configuration R times, in interleaved rounds (dense, each
budget, dense, ...), and reports each configuration's median decode tokens/s (the other figures are
the median run's) and the spread: the machines are shared, and one run of each drifted by up to 1.5x
between neighbouring runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run_cli(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sparseflash.tools.cli", *args, "--json"], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def baseline_rss() -> int:
    """Peak RSS of a process that only imports torch/numba and compiles the kernels."""
    code = ("import resource, torch, numba\nfrom sparseflash.kernels import get_backend\n"
            "get_backend('cpu').warmup(('f16',))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600).stdout)


def verification_gbps(layout: str) -> float:
    """Throughput of the reader's per-bundle check (runtime/streamer.py) over all of a layout's bundles."""
    import time

    import numpy as np

    from sparseflash.layout.format import LayoutFile
    from sparseflash.runtime.bundle_checks import check_bundles

    with LayoutFile.open(layout) as f:
        regions = list(f.layers)
        rows = [f.read_bundles(l.index, start=0, count=l.n_neurons) for l in regions]
    t = time.perf_counter()
    for region, r in zip(regions, rows):
        check_bundles(layout, region, np.arange(len(r)), r)
    return sum(r.nbytes for r in rows) / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint for the dense run (default: bundled)")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--prompt", default="The os module provides")
    p.add_argument("--budgets", default="25%ffn,50%ffn,100%ffn")
    p.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda")
    p.add_argument("--verify", choices=["on", "off", "both"], default="on",
                   help="per-read bundle verification in the streamed rows (both: each budget twice)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of every configuration (median reported)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="run every budget again with these extra `sparseflash run` arguments, e.g. "
                        "'strict=--lookahead-raise 2' (repeatable; side by side with the default rows)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    variants = [("", [])]
    for v in args.variant:
        name, sep, extra = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"bench: --variant needs NAME=ARGS, got {v!r}")
        variants.append((f" {name}", extra.split()))
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be >= 1")
    layout = args.layout
    if layout is None:
        from sparseflash.layout.pipeline import prepare_bundled

        layout = str(prepare_bundled(quiet=True, log=lambda m: print(m, file=sys.stderr)))
    common = ["-p", args.prompt, "-n", str(args.n), "--greedy", "--ignore-eos"]
    configs = [("dense (in memory)", ["run", *(["-m", args.checkpoint] if args.checkpoint else []), *common])]
    devices = args.devices.split(",")
    checks = {"on": [True], "off": [False], "both": [True, False]}[args.verify]
    for budget in args.budgets.split(","):
        for device in devices:
            for check in checks:
                for vname, extra in variants:
                    configs.append((f"streamed {budget}" + (f" {device}" if len(devices) > 1 else "")
                                    + ("" if len(checks) == 1 else (" verified" if check else " --no-verify")) + vname,
                                    ["run", "-m", layout, "--budget", budget, "--device", device, *common,
                                     *([] if check else ["--no-verify"]), *extra]))
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for _ in range(args.repeat):  # interleaved rounds: a slow spell of the machine hits every configuration
        for name, cli in configs:
            runs[name].append(run_cli(cli))
    rows = []
    for name, _ in configs:
        ordered = sorted(runs[name], key=lambda r: r["decode_tokens_per_s"])
        r = dict(ordered[len(ordered) // 2], config=name, runs_decode_tokens_per_s=[x["decode_tokens_per_s"]
                                                                                  for x in runs[name]])
        rows.append(r)
    dense = rows[0]
    base = baseline_rss()
    check_gbps = verification_gbps(layout) if args.verify == "both" else None
    if args.json:
        print(json.dumps({"baseline_rss_bytes": base, "rows": rows, "verification_gbps": check_gbps}))
        return
    mib = 2**20
    print(f"{os.path.basename(layout)}: {args.n} tokens, greedy; baseline RSS (interpreter + torch + numba + "
          f"compiled kernels) {base / mib:.0f} MiB")
    print(f"median of {args.repeat} interleaved run(s) per configuration; tok/s range in brackets")
    w = max(27, *(len(r["config"]) + 2 for r in rows))
    print(f"{'config':<{w}}{'tok/s':>8}{'range':>14}{'vs dense':>10}{'FFN KiB/tok':>13}{'% dense':>9}{'hit rate':>10}"
          f"{'budget MiB':>12}{'peak RSS MiB':>14}{'RSS - base':>12}")
    d_tps = dense["decode_tokens_per_s"]
    for r in rows:
        streamed = r["engine"] == "streamed"
        spread = r["runs_decode_tokens_per_s"]
        print(f"{r['config']:<{w}}{r['decode_tokens_per_s']:>8.1f}{f'[{min(spread):.0f}-{max(spread):.0f}]':>14}"
              f"{r['decode_tokens_per_s'] / d_tps:>9.2f}x"
              f"{(r['decode_bytes_per_token'] / 1024 if streamed else 0):>13.1f}"
              f"{(r['decode_dense_share'] * 100 if streamed else 100):>8.1f}%"
              f"{(r['hit_rate'] * 100 if streamed else 100):>9.1f}%"
              f"{(r['budget_bytes'] / mib if streamed else float('nan')):>12.1f}"
              f"{r.get('peak_rss_bytes', 0) / mib:>14.0f}{(r.get('peak_rss_bytes', 0) - base) / mib:>12.0f}")
    if check_gbps is not None:
        print(f"per-read check (xxh3_64 digest + finite values) over every bundle of the layout: {check_gbps:.2f} GB/s "
              "on one thread")
    for r in rows:
        if "device_bytes_used" in r:
            print(f"{r['config']}: device memory added by the run {r['device_bytes_used'] / mib:.0f} MiB "
                  f"(budget {r['budget_bytes'] / mib:.1f} MiB + KV cache + CUDA kernels and libraries)")


if __name__ == "__main__":
    main()
