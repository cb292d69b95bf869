"""CLI: ``sparseflash prepare``, ``layout``, ``inspect`` and ``layout-report``."""

from __future__ import annotations

import json
import sys

from sparseflash.layout.params import LAYOUT_DTYPES, ORDERS, THRESHOLD_SETS, LayoutParams, PrepareParams
from sparseflash.paths import (
    input_file,
    input_folder,
    input_model,
    note,
    output_dir,
    output_file,
    sweep_stale_temps,
)


def cmd_layout(args) -> int:
    from sparseflash.layout.build import build_layout
    from sparseflash.model.source import open_source

    params = LayoutParams(order=args.order, dtype=args.dtype, resident_dtype=args.resident_dtype,
                          hot_fraction=args.hot_fraction, thresholds=args.thresholds, zstd_level=args.zstd)
    input_model(args.model)
    input_folder(args.profile, "profile folder", (".json", ".npz", ".npy"), "; run `sparseflash profile` first")
    if args.predictors is not None:
        input_folder(args.predictors, "predictors folder", (".json", ".safetensors"),
                     "; run `sparseflash predictors` first")
    output_file(args.out, "layout file")
    sweep_stale_temps(args.out, note)
    with open_source(args.model) as source:
        h = build_layout(source, args.profile, args.out, args.predictors, params, source.content_hash(),
                         quiet=args.json)
    methods = [r["method"] for r in h.provenance["order_report"]]
    summary = {"path": args.out, "order": params.order, "dtype": h.dtype, "n_hot": h.n_hot,
               "bundle_bytes": h.bundle_bytes, "predictors": h.predictors is not None, "methods": methods}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"layout -> {args.out}: order {params.order} ({', '.join(methods)}), {h.dtype} bundles of "
              f"{h.bundle_bytes} B, {h.n_hot} hot neurons/layer, predictors: {summary['predictors']}")
    return 0


def cmd_inspect(args) -> int:
    from sparseflash.eval.inspect import inspect_layout
    from sparseflash.eval.render import inspect_text

    out = inspect_layout(args.file, verify=args.verify)
    print(json.dumps(out) if args.json else inspect_text(out))
    if not out["ok"]:
        failures = [f.removeprefix(f"{args.file}: ") for f in out.get("verify_failures", [])]
        reason = out.get("schema_error") or (f"{args.file}: {len(failures)} checksum failure"
                                             f"{'s' if len(failures) > 1 else ''}, the first: {failures[0]}")
        print(f"sparseflash: error: {reason}", file=sys.stderr)
        return 2
    return 0


def cmd_layout_report(args) -> int:
    from sparseflash.eval.layout_report import layout_report
    from sparseflash.eval.render import layout_report_text
    from sparseflash.model.text import corpus_ids
    from sparseflash.runtime.iomodel import DeviceModel
    from sparseflash.runtime.layout_model import open_layout

    input_file(args.file, "layout file")
    device = DeviceModel.from_file(args.device_model) if args.device_model else None
    lm = open_layout(args.file)
    ids = corpus_ids(args.corpus, lm.tokenizer, args.tokens)
    lm.close()
    r = layout_report(args.file, ids, args.tokens, args.ctx, device, quiet=args.json)
    print(json.dumps(r) if args.json else layout_report_text(r))
    return 0


def cmd_prepare(args) -> int:
    from sparseflash.errors import SparseflashError
    from sparseflash.layout.pipeline import prepare, prepared_dir
    from sparseflash.units import parse_bytes

    params = PrepareParams(profile_tokens=args.tokens, predictor_tokens=args.tokens, heldout_tokens=args.heldout_tokens,
                           cett_tokens=args.cett_tokens, rank=args.rank, epochs=args.epochs, order=args.order,
                           hot_fraction=args.hot_fraction, dtype=args.dtype, resident_dtype=args.resident_dtype,
                           gate_rise_pct=args.gate_rise, per_layer_cuts=not args.no_per_layer_cuts,
                           rank_spread=args.rank_spread, split_cache=not args.even_cache)
    memory = None
    if args.memory is not None:
        memory = parse_bytes(args.memory)
        if memory is None:
            raise SparseflashError(f"--memory {args.memory!r} is not a size (e.g. 12GiB, 800MB)")
    input_model(args.model)
    input_file(args.corpus, "calibration text")
    if args.heldout:
        input_file(args.heldout, "held-out text")
    out = args.out or str(prepared_dir(args.model))
    output_dir(out, "prepared folder")
    path = prepare(args.model, args.corpus, args.heldout or args.corpus, out, params, quiet=args.json,
                   log=lambda m: print(m, file=sys.stderr), memory=memory)
    print(json.dumps({"layout": str(path), "dir": out}) if args.json else f"prepared -> {path}")
    return 0


def _layout_options(p) -> None:
    p.add_argument("--order", choices=ORDERS, default=LayoutParams.order)
    p.add_argument("--dtype", choices=LAYOUT_DTYPES, default=LayoutParams.dtype,
                   help="FFN bundle storage (q8/q4: 8/4-bit groups of 32 along d, GGUF Q8_0/Q4_0 arithmetic)")
    p.add_argument("--resident-dtype", choices=LAYOUT_DTYPES, default=LayoutParams.resident_dtype,
                   help="attention, embeddings and head (default: as --dtype, f16 when that is quantized)")
    p.add_argument("--hot-fraction", type=float, default=LayoutParams.hot_fraction,
                   help="share of neurons pinned resident per layer")


def register(sub) -> None:
    q = sub.add_parser("prepare", help="profile + predictors + layout of a checkpoint, cached")
    q.add_argument("-m", "--model", required=True, help="checkpoint folder")
    q.add_argument("--corpus", required=True, help="calibration text")
    q.add_argument("--heldout", default=None, help="held-out text (default: the corpus)")
    q.add_argument("--tokens", type=int, default=PrepareParams.profile_tokens)
    q.add_argument("--heldout-tokens", type=int, default=PrepareParams.heldout_tokens)
    q.add_argument("--cett-tokens", type=int, default=PrepareParams.cett_tokens,
                   help="threshold-sample tokens (the CETT search)")
    q.add_argument("--rank", type=int, default=PrepareParams.rank,
                   help="predictor rank (default 0: chosen by measurement at the first layer)")
    q.add_argument("--epochs", type=int, default=PrepareParams.epochs, help="predictor training epochs")
    q.add_argument("--rank-spread", type=float, default=PrepareParams.rank_spread, metavar="S",
                   help="each layer's predictor rank follows its active share to the power S, same total (0: one rank)")
    q.add_argument("--gate-rise", type=float, default=PrepareParams.gate_rise_pct, metavar="PCT",
                   help="quality gate: the predicted mode must keep held-out perplexity within this rise over dense "
                        "(percent), else prepare falls back (other strategy, then exact streaming)")
    q.add_argument("--no-per-layer-cuts", action="store_true",
                   help="one miss cut for every layer (default: each layer's own where a validated mix reads less)")
    q.add_argument("--even-cache", action="store_true",
                   help="no cache demand in the layout: a run gives every layer the same cache (default: each layer "
                        "its share by demand, measured on the calibration text, and the miss cuts validated so)")
    q.add_argument("--memory", default=None, metavar="SIZE",
                   help="peak memory allowed (e.g. 12GiB): hidden states spill to temporary files to stay under it, "
                        "or prepare refuses before it starts (the expected peak is printed either way)")
    _layout_options(q)
    q.add_argument("-o", "--out", default=None, help="directory (default: the cache, $SPARSEFLASH_CACHE)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_prepare)

    p = sub.add_parser("layout", help="write the co-activation-ordered bundle file")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--profile", required=True, help="profile directory")
    p.add_argument("--predictors", default=None, help="predictors directory")
    p.add_argument("-o", "--out", required=True, help="output .sflash file")
    _layout_options(p)
    p.add_argument("--thresholds", choices=THRESHOLD_SETS, default=LayoutParams.thresholds,
                   help="which profile thresholds")
    p.add_argument("--zstd", type=int, default=LayoutParams.zstd_level, metavar="LEVEL",
                   help="compress FFN chunks with zstd")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layout)

    i = sub.add_parser("inspect", help="header, index summary and (--verify) checksums of a layout file")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true", help="check every checksum; exit 2 if any fails")
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
