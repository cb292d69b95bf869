"""CLI: ``sparseflash io-report`` and ``sparseflash probe``."""

from __future__ import annotations

import json
import sys


def cmd_io_report(args) -> int:
    from sparseflash.eval.heldout import eval_ids
    from sparseflash.eval.io_report import io_report, save_report
    from sparseflash.eval.render import io_markdown
    from sparseflash.paths import input_file, output_dir
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.policy import Budget

    Budget.check_text(args.budget)
    for path in args.model:
        input_file(path, "layout file")
    if args.out:
        output_dir(args.out, "report folder")
    lm = open_layout(args.model[0])
    gate = lm.header.predictors.gate if lm.header.predictors is not None else None
    ids, skipped, note = eval_ids(args.corpus, lm.tokenizer, args.tokens, args.ctx, args.skip, gate)
    lm.close()
    if note:
        print(note, file=sys.stderr)
    if args.ablation:  # which change buys what (eval/ablation.py), instead of the modes
        from sparseflash.eval.ablation import ablation_markdown, fetch_ablation

        budgets = tuple(b.strip() for b in args.ablation.split(","))
        for b in budgets:
            Budget.check_text(b)
        r = {**fetch_ablation(args.model[0], ids, args.tokens, args.ctx, budgets, quiet=args.json), "skipped_tokens": skipped}
        print(json.dumps(r) if args.json else ablation_markdown(r))
        return 0
    r = io_report(args.model, ids, args.tokens, args.ctx, args.budget, quiet=args.json, evictions=not args.no_eviction)
    r["skipped_tokens"] = skipped
    if args.out:
        save_report(r, args.out)
    print(json.dumps(r) if args.json else io_markdown(r))
    return 0


def cmd_probe(args) -> int:
    from sparseflash.paths import input_file
    from sparseflash.runtime.diskprobe import cache_file_for, device_model_for

    input_file(args.model, "layout file")
    model = device_model_for(args.model, refresh=True)
    where = str(cache_file_for(args.model))
    if args.json:
        print(json.dumps({**model.to_dict(), "cache_file": where}))
        return 0
    print(f"{model.source}")
    for lv in model.levels or (model.level(1),):
        print(f"  {lv.depth:>2} in flight: {lv.latency_s * 1e6:7.0f} us + bytes / {lv.bandwidth_bps / 1e9:5.2f} GB/s"
              f"   (1 MiB reads: {lv.throughput(1 << 20) / 1e9:.2f} GB/s)")
    print(f"cached in {where}; every run on this file system plans its reads from it")
    return 0


def register(sub) -> None:
    p = sub.add_parser("io-report", help="FFN I/O per token: dense-stream, sparse, sparse+window, oracle")
    p.add_argument("-m", "--model", nargs="+", required=True, help="layout file(s); several give an order ablation")
    p.add_argument("--corpus", required=True, help="held-out text")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--skip", type=int, default=None, metavar="N",
                   help="start after the first N tokens of the text (default: after those the layout's quality gate "
                        "chose its cuts on, when --corpus is its held-out text; else 0)")
    p.add_argument("--budget", default="50%ffn",
                   help="bytes (2GiB), share of the model (40%%) or share of the FFN bytes for hot region + cache (25%%ffn)")
    p.add_argument("-o", "--out", default=None, help="directory for io_report.json/.md and io_vs_budget.png")
    p.add_argument("--no-eviction", action="store_true",
                   help="skip the eviction-policy comparison (five more engine passes over the tokens)")
    p.add_argument("--ablation", default=None, metavar="BUDGETS",
                   help="instead of the modes: the fetch ablation (cost-aware selection, look-ahead, "
                        "eviction, the oracle and online floors) at these comma-separated budgets, e.g. 25%%ffn,50%%ffn (eval/ablation.py)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_io_report)

    p = sub.add_parser("probe", help="measure the disk under a layout again and replace its cached device model")
    p.add_argument("-m", "--model", required=True, help="layout file (its disk is read, never written)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)
