"""The streaming reader alone: achieved read bandwidth next to the device model's, per queue depth.

Reads a layout's FFN bundles through runtime/streamer.py's BundleReader exactly as the engine does
(O_DIRECT, extents merged at the reader's gap, cut to its buffer size, one thread per read in
flight) and prints, for each queue depth the device model measured and the depth it plans, the
achieved GB/s (bytes / wall time of the reads) next to the model's for the same pieces at the same
depth (ReadResult.model_s). Two access patterns per token and layer: every bundle of the layer
(exact streaming through a cache smaller than the model) and a random share of them (--share; the
predicted-neuron pattern). No compute runs, so the figures are the reader's and the disk's.

    python bench/bench_reads.py [--layout M.sflash] [--tokens 8] [--share 0.3] [--out F.json]

Without --layout the bundled model's layout is used (prepared on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def measure(path: str, regions, device, threads: int, buffer_bytes: int, pattern: str, tokens: int, share: float,
            seed: int = 0) -> dict:
    """Read ``tokens`` tokens' worth of bundles, layer after layer; achieved and modelled GB/s."""
    from sparseflash.runtime.streamer import BundleReader

    rng = np.random.default_rng(seed)
    reader = BundleReader(path, regions, device, "direct", threads, buffer_bytes, verify=False)
    try:
        scratch = [np.zeros((r.n_neurons, r.bundle_len), dtype=np.uint16 if r.dtype != "f32" else np.float32)
                   for r in regions]
        nbytes = requests = 0
        wall = model = 0.0
        for _ in range(tokens):
            for l, r in enumerate(regions):
                if pattern == "all":
                    pos = np.arange(r.n_neurons)
                else:
                    pos = np.sort(rng.choice(r.n_neurons, max(1, int(share * r.n_neurons)), replace=False))
                t = time.perf_counter()
                res = reader.read(l, pos, scratch[l], np.arange(len(pos)))
                wall += time.perf_counter() - t
                nbytes, requests, model = nbytes + res.bytes, requests + res.requests, model + res.model_s
        return {"threads": threads, "buffer_bytes": buffer_bytes, "pattern": pattern, "bytes": nbytes,
                "requests": requests, "mean_request_bytes": nbytes / max(requests, 1), "direct_io": reader.direct,
                "achieved_gbps": nbytes / wall / 1e9, "device_model_gbps": nbytes / model / 1e9 if model else 0.0,
                "achieved_share_of_model": model / wall if wall else 0.0}
    finally:
        reader.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default=None, help="a .sflash file (default: the bundled model's layout)")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--share", type=float, default=0.3, help="share of each layer's bundles in the random pattern")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from sparseflash.layout.format import LayoutFile
    from sparseflash.layout.pipeline import prepare_bundled
    from sparseflash.runtime.diskprobe import device_model_for

    path = str(args.layout or prepare_bundled(quiet=True))
    device = device_model_for(path)
    with LayoutFile.open(path) as f:
        regions = list(f.layers)
    planned = device.plan_io()
    load = os.getloadavg()
    rows = []
    for threads in sorted({*device.depths, planned[0]}):
        for pattern in ("all", "random"):
            row = measure(path, regions, device, threads, planned[1], pattern, args.tokens, args.share)
            row["planned"] = threads == planned[0]
            rows.append(row)
            print(f"{pattern:<7} QD{threads:<3} {row['buffer_bytes'] >> 10:>5} KiB buffers, "
                  f"{row['mean_request_bytes'] / 1024:8.1f} KiB/request: achieved {row['achieved_gbps']:6.3f} GB/s, "
                  f"model {row['device_model_gbps']:6.3f} GB/s ({row['achieved_share_of_model']:.0%})"
                  + ("  <- planned" if row["planned"] else ""), flush=True)
    report = {"layout": path, "device_model": device.to_dict(), "planned_io": planned, "tokens": args.tokens,
              "share": args.share, "loadavg_before": load, "loadavg_after": os.getloadavg(), "rows": rows}
    print(f"load average {load[0]:.2f} -> {report['loadavg_after'][0]:.2f}; device model: {device.source}")
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
