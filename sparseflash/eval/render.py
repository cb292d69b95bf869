"""Reports as people read them: markdown tables and text lines rendered from the report dicts
that the measuring functions return (and save as JSON)."""

from __future__ import annotations

from pathlib import Path

from sparseflash.units import fmt_bytes


def _gbps(m: dict) -> str:
    """Achieved read GB/s and, in brackets, the device model's for the same reads ('-' when not measured)."""
    return f"{m['achieved_gbps']:.2f} ({m['device_model_gbps']:.2f})" if "achieved_gbps" in m else "-"


def io_markdown(r: dict) -> str:
    """eval/io_report.py's report as markdown: the modes per layout, then the eviction comparison."""
    after = f" (after the first {r['skipped_tokens']})" if r.get("skipped_tokens") else ""
    lines = [f"FFN I/O per token, teacher-forced on {r['tokens']} held-out tokens{after}, budget {r['budget']} "
             f"({fmt_bytes(r['budget_bytes'])})", "",
             "| layout | mode | bytes/token | % of dense | requests/token | bytes/request | hit rate | "
             "I/O ms/token | GB/s (model) | ppl | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in r["layouts"]:
        name = f"{Path(entry['layout']).name} ({entry['order']})"
        for mode in ("dense-stream", "sparse", "sparse+window", "oracle"):
            m = entry["modes"][mode]
            lines.append(f"| {name} | {mode} | {fmt_bytes(m['bytes_per_token'])} | {m['dense_share']:.1%} | "
                         f"{m['requests_per_token']:.1f} | {fmt_bytes(m['bytes_per_request'])} | {m['hit_rate']:.1%} | "
                         f"{m['io_ms_per_token']:.3f} | {_gbps(m)} | {m['ppl']:.3f} | {m['top1_agreement']:.3f} |")
        lines.append(f"| {name} | neurons fetched vs oracle | x{entry['fetched_vs_oracle']:.2f} | | | | | | | | |")
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


def layout_report_text(r: dict) -> str:
    """eval/layout_report.py's report as a few aligned lines."""
    dm = r["device_model"]
    lines = [f"{r['layout']}: order {r['order']}, {r['tokens']} held-out tokens, "
             f"{r['active_per_layer_per_token']:.1f} active neurons/layer/token",
             f"device model: {dm['latency_s'] * 1e6:.0f} us/request + {dm['bandwidth_bps'] / 1e6:.0f} MB/s "
             f"({dm['source']})" + "".join(f"; QD{lv['depth']}: {lv['latency_s'] * 1e6:.0f} us + "
                                           f"{lv['bandwidth_bps'] / 1e6:.0f} MB/s" for lv in dm.get("levels", [])[1:]),
             f"{'order':<22}{'requests/tok':>14}{'bytes/request':>15}{'bytes/tok':>13}{'read ms/tok':>13}"]
    for name, row in (("file (" + str(r["order"]) + ")", r), ("identity", r["identity"]),
                      ("identity, same hot", r["identity_same_hot"])):
        lines.append(f"{name:<22}{row['requests_per_token']:>14.2f}{fmt_bytes(row['bytes_per_request']):>15}"
                     f"{fmt_bytes(row['bytes_per_token']):>13}{row['modelled_read_ms_per_token']:>13.3f}")
    lines.append(f"vs identity: requests x{r['requests_ratio_vs_identity']:.2f}, bytes "
                 f"x{r['bytes_ratio_vs_identity']:.2f}, modelled read time x{r['modelled_time_ratio_vs_identity']:.2f}")
    return "\n".join(lines)


def inspect_text(out: dict) -> str:
    """eval/inspect.py's summary of a layout file as a few lines."""
    header = out["header"]
    m, prov = (v if isinstance(v, dict) else {} for v in (header.get("model"), header.get("provenance")))
    lines = [f"{out['file']}: {m.get('arch')} {m.get('num_layers')} layers, order {prov.get('order')}, "
             f"{header.get('dtype')} bundles of {header.get('bundle_bytes')} B, hot {header.get('n_hot')}/layer",
             f"  resident {fmt_bytes(out['resident_bytes'])} in {out['tensors']} tensors, "
             f"FFN regions {fmt_bytes(out['ffn_bytes'])}, predictors: {header.get('predictors') is not None}"]
    gate = (header.get("predictors") or {}).get("gate") if isinstance(header.get("predictors"), dict) else None
    if gate:
        from sparseflash.layout.quality_gate import gate_line

        lines.append(f"  {gate_line(gate)}")
    if "compression" in out:
        z = out["compression"]
        lines.append(f"  zstd: FFN {fmt_bytes(z['raw_bytes'])} -> {fmt_bytes(z['stored_bytes'])} ({z['ratio']:.1%}), "
                     f"read + decode {z['decode_mb_per_s']:.0f} MB/s (page cache, not a disk measure)")
    if "verified" in out:
        lines.append("  checksums: " + ("all verified" if out["verified"] else
                                         f"FAILED ({len(out['verify_failures'])} regions): "
                                         + "; ".join(out["verify_failures"][:5])))
    return "\n".join(lines)
