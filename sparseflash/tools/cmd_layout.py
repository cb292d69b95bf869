"""CLI: ``sparseflash layout``, ``inspect`` and ``layout-report``."""

from __future__ import annotations

import json
import os
import sys

from sparseflash.tools.format import fmt_bytes


def cmd_layout(args) -> int:
    from sparseflash.layout.build import build_layout
    from sparseflash.model.checkpoint import checkpoint_hash
    from sparseflash.model.loader import open_dense

    model = open_dense(args.model)
    h = build_layout(model, args.profile, args.out, args.predictors, args.order, args.dtype, args.hot_fraction,
                     args.thresholds, args.zstd, checkpoint_hash(model.source), quiet=args.json)
    summary = {"path": args.out, "order": h["order"], "dtype": h["dtype"], "n_hot": h["n_hot"],
               "bundle_bytes": h["bundle_bytes"], "predictors": h["predictors"] is not None,
               "methods": [r["method"] for r in h["order_report"]]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"layout -> {args.out}: order {h['order']} ({', '.join(summary['methods'])}), {h['dtype']} bundles "
              f"of {h['bundle_bytes']} B, {h['n_hot']} hot neurons/layer, predictors: {summary['predictors']}")
    return 0


def cmd_inspect(args) -> int:
    from sparseflash.errors import ArtefactError
    from sparseflash.layout.format import LayoutError, LayoutFile

    try:
        f = LayoutFile.open(args.file)
    except FileNotFoundError:
        raise ArtefactError(f"{args.file}: layout file not found") from None
    with f:
        header = {k: v for k, v in f.header.items() if k not in ("tokenizer_json", "order_report")}
        layers = [{"layer": i, "n_neurons": l.n_neurons, "n_hot": l.n_hot, "dtype": l.dtype,
                   "bundle_bytes": l.bundle_bytes, "offset": l.offset, "length": l.length,
                   "threshold": l.threshold, "compressed": l.compressed} for i, l in enumerate(f.layers)]
        resident = sum(t.nbytes for t in f.tensors.values())
        out = {"file": args.file, "header": header, "layers": layers, "tensors": len(f.tensors),
               "resident_bytes": resident, "ffn_bytes": sum(l.length for l in f.layers)}
        if any(l.compressed for l in f.layers):
            out["compression"] = _measure_compression(f)
        if args.verify:
            try:
                f.verify()
                out["verified"] = True
            except LayoutError as e:
                out["verified"] = False
                out["verify_error"] = str(e)
    if args.json:
        print(json.dumps(out))
    else:
        m = header.get("model", {})
        print(f"{args.file}: {m.get('arch')} {m.get('num_layers')} layers, order {header.get('order')}, "
              f"{header.get('dtype')} bundles of {header.get('bundle_bytes')} B, hot {header.get('n_hot')}/layer")
        print(f"  resident {fmt_bytes(out['resident_bytes'])} in {out['tensors']} tensors, "
              f"FFN regions {fmt_bytes(out['ffn_bytes'])}, predictors: {header.get('predictors') is not None}")
        if "compression" in out:
            z = out["compression"]
            print(f"  zstd: FFN {fmt_bytes(z['raw_bytes'])} -> {fmt_bytes(z['stored_bytes'])} ({z['ratio']:.1%}), "
                  f"read + decode {z['decode_mb_per_s']:.0f} MB/s (page cache, not a disk measure)")
        if args.verify:
            print("  checksums: " + ("all verified" if out["verified"] else f"FAILED ({out['verify_error']})"))
    return 0 if out.get("verified", True) else 2


def _measure_compression(f) -> dict:
    """Stored vs raw FFN bytes and the measured zstd decode speed over every chunk."""
    import time

    raw = stored = 0
    t = time.perf_counter()
    for i, layer in enumerate(f.layers):
        for k in range(len(layer.chunks.offset)):
            f.read_chunk(i, k)
        raw += int(layer.chunks.raw_length.sum())
        stored += int(layer.chunks.stored_length.sum())
    seconds = time.perf_counter() - t
    return {"raw_bytes": raw, "stored_bytes": stored, "ratio": stored / raw if raw else 1.0,
            "read_and_decode_s": seconds, "decode_mb_per_s": raw / seconds / 1e6 if seconds else 0.0}


def cmd_layout_report(args) -> int:
    from sparseflash.model.text import corpus_ids
    from sparseflash.runtime.iomodel import DeviceModel
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.layout_report import layout_report

    lm = open_layout(args.file)
    ids = corpus_ids(args.corpus, lm.tokenizer, args.tokens)
    lm.close()
    device = None
    if args.device_model:
        d = json.loads(open(args.device_model).read())
        device = DeviceModel(d["latency_s"], d["bandwidth_bps"], d.get("source", args.device_model))
    r = layout_report(args.file, ids, args.tokens, args.ctx, device, quiet=args.json)
    if args.json:
        print(json.dumps(r))
        return 0
    dm = r["device_model"]
    print(f"{args.file}: order {r['order']}, {r['tokens']} held-out tokens, "
          f"{r['active_per_layer_per_token']:.1f} active neurons/layer/token")
    print(f"device model: {dm['latency_s'] * 1e6:.0f} us/request + {dm['bandwidth_bps'] / 1e6:.0f} MB/s ({dm['source']})")
    print(f"{'order':<22}{'requests/tok':>14}{'bytes/request':>15}{'bytes/tok':>13}{'read ms/tok':>13}")
    for name, row in (("file (" + str(r["order"]) + ")", r), ("identity", r["identity"]),
                      ("identity, same hot", r["identity_same_hot"])):
        print(f"{name:<22}{row['requests_per_token']:>14.2f}{fmt_bytes(row['bytes_per_request']):>15}"
              f"{fmt_bytes(row['bytes_per_token']):>13}{row['modelled_read_ms_per_token']:>13.3f}")
    print(f"vs identity: requests x{r['requests_ratio_vs_identity']:.2f}, bytes x{r['bytes_ratio_vs_identity']:.2f}, "
          f"modelled read time x{r['modelled_time_ratio_vs_identity']:.2f}")
    return 0


def cmd_prepare(args) -> int:
    from sparseflash.layout.pipeline import PrepareParams, cache_root, prepare
    from sparseflash.model.checkpoint import checkpoint_hash

    params = PrepareParams(profile_tokens=args.tokens, predictor_tokens=args.tokens, heldout_tokens=args.heldout_tokens,
                           rank=args.rank, order=args.order, hot_fraction=args.hot_fraction, dtype=args.dtype)
    out = args.out or str(cache_root() / f"{os.path.basename(os.path.normpath(args.model))}-{checkpoint_hash(args.model)}")
    path = prepare(args.model, args.corpus, args.heldout or args.corpus, out, params, quiet=args.json,
                   log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"layout": str(path), "dir": out}) if args.json else f"prepared -> {path}")
    return 0


def register(sub) -> None:
    q = sub.add_parser("prepare", help="profile + predictors + layout of a checkpoint, cached")
    q.add_argument("-m", "--model", required=True, help="checkpoint folder")
    q.add_argument("--corpus", required=True, help="calibration text")
    q.add_argument("--heldout", default=None, help="held-out text (default: the corpus)")
    q.add_argument("--tokens", type=int, default=32768)
    q.add_argument("--heldout-tokens", type=int, default=4096)
    q.add_argument("--rank", type=int, default=0)
    q.add_argument("--order", choices=["coact", "frequency", "identity"], default="coact")
    q.add_argument("--hot-fraction", type=float, default=0.1)
    q.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    q.add_argument("-o", "--out", default=None, help="directory (default: the cache, $SPARSEFLASH_CACHE)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_prepare)

    p = sub.add_parser("layout", help="write the co-activation-ordered bundle file")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--profile", required=True, help="profile directory")
    p.add_argument("--predictors", default=None, help="predictors directory")
    p.add_argument("-o", "--out", required=True, help="output .sflash file")
    p.add_argument("--order", choices=["coact", "frequency", "identity"], default="coact")
    p.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    p.add_argument("--hot-fraction", type=float, default=0.05, help="share of neurons pinned resident per layer")
    p.add_argument("--thresholds", choices=["ppl", "cett"], default="ppl", help="which profile thresholds")
    p.add_argument("--zstd", type=int, default=None, metavar="LEVEL", help="compress FFN chunks with zstd")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layout)

    i = sub.add_parser("inspect", help="header, index summary and (--verify) checksums of a layout file")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("layout-report", help="I/O requests and bytes per token of a layout on held-out text")
    r.add_argument("file")
    r.add_argument("--corpus", required=True, help="held-out text")
    r.add_argument("--tokens", type=int, default=8192)
    r.add_argument("--ctx", type=int, default=256)
    r.add_argument("--device-model", default=None, help="JSON with latency_s and bandwidth_bps (default: probe)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_layout_report)
