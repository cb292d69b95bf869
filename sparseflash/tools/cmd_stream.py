"""CLI: ``sparseflash io-report``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparseflash.tools.format import fmt_bytes


def io_markdown(r: dict) -> str:
    lines = [f"FFN I/O per token, teacher-forced on {r['tokens']} held-out tokens, budget {r['budget']} "
             f"({fmt_bytes(r['budget_bytes'])})", "",
             "| layout | mode | bytes/token | % of dense | requests/token | bytes/request | hit rate | "
             "I/O ms/token | ppl | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in r["layouts"]:
        name = f"{Path(entry['layout']).name} ({entry['order']})"
        for mode in ("dense-stream", "sparse", "sparse+window", "oracle"):
            m = entry["modes"][mode]
            lines.append(f"| {name} | {mode} | {fmt_bytes(m['bytes_per_token'])} | {m['dense_share']:.1%} | "
                         f"{m['requests_per_token']:.1f} | {fmt_bytes(m['bytes_per_request'])} | {m['hit_rate']:.1%} | "
                         f"{m['io_ms_per_token']:.3f} | {m['ppl']:.3f} | {m['top1_agreement']:.3f} |")
        lines.append(f"| {name} | neurons fetched vs oracle | x{entry['fetched_vs_oracle']:.2f} | | | | | | | |")
    ev = r["layouts"][0].get("eviction")
    if ev:
        floor = max(ev["belady"]["neurons_fetched_per_token"], 1e-12)
        lines += ["", f"Eviction beyond the window ({Path(r['layouts'][0]['layout']).name}: same predicted sets, "
                  "same budget; belady = optimal eviction of that trace, simulated)", "",
                  "| policy | bytes/token | requests/token | hit rate | neurons fetched/token | vs belady |",
                  "|---|---:|---:|---:|---:|---:|"]
        for policy, m in ev.items():
            lines.append(f"| {policy} | {fmt_bytes(m['bytes_per_token'])} | {m['requests_per_token']:.1f} | "
                         f"{m['hit_rate']:.1%} | {m['neurons_fetched_per_token']:.1f} | "
                         f"x{m['neurons_fetched_per_token'] / floor:.2f} |")
    return "\n".join(lines)


def cmd_io_report(args) -> int:
    from sparseflash.model.text import corpus_ids
    from sparseflash.runtime.io_report import io_report, plot_io
    from sparseflash.runtime.layout_model import open_layout

    lm = open_layout(args.model[0])
    ids = corpus_ids(args.corpus, lm.tokenizer, args.tokens)
    lm.close()
    r = io_report(args.model, ids, args.tokens, args.ctx, args.budget, quiet=args.json,
                  evictions=not args.no_eviction)
    md = io_markdown(r)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("io_report.json", json.dumps(r, indent=1)), ("io_report.md", md + "\n")):
            tmp = out / f".{name}.tmp-{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, out / name)
        plot_io(r, out / "io_vs_budget.png")
    print(json.dumps(r) if args.json else md)
    return 0


def register(sub) -> None:
    p = sub.add_parser("io-report", help="FFN I/O per token: dense-stream, sparse, sparse+window, oracle")
    p.add_argument("-m", "--model", nargs="+", required=True, help="layout file(s); several give an order ablation")
    p.add_argument("--corpus", required=True, help="held-out text")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--budget", default="50%ffn",
                   help="bytes (2GiB), share of the model (40%%) or share of the FFN bytes for hot region + cache (25%%ffn)")
    p.add_argument("-o", "--out", default=None, help="directory for io_report.json/.md and io_vs_budget.png")
    p.add_argument("--no-eviction", action="store_true",
                   help="skip the eviction-policy comparison (three more engine passes over the tokens)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_io_report)
