"""CLI: ``sparseflash plugins train|eval|info`` (compression plugins, docs/plugins.md)."""

from __future__ import annotations

import json

from sparseflash.tools.format import fmt_bytes


def cmd_train(args) -> int:
    import torch

    from sparseflash.layout.plugin_train import PluginTrainParams, train_plugin_file

    if args.threads:
        torch.set_num_threads(args.threads)
    params = PluginTrainParams(ratio=args.ratio, layer=args.layer, tail=args.tail, rank=args.rank, rope=args.rope,
                               prompt_tokens=args.prompt_tokens, min_prompt_tokens=args.min_prompt_tokens,
                               continuation_tokens=args.continuation_tokens, steps=args.steps, batch=args.batch,
                               lr=args.lr, seed=args.seed)
    plugin = train_plugin_file(args.model, args.corpus, params, args.output, quiet=args.json)
    if args.json:
        print(json.dumps({"output": args.output, "ratio": plugin.ratio, "layer": plugin.layer,
                          "parameters": plugin.param_count, "quality": plugin.quality,
                          "training": plugin.training_record}))
        return 0
    t, q = plugin.training_record, plugin.quality
    rises = ", ".join(f"{n} tokens {100 * r:+.2f}%" for n, r in q.get("ppl_rise", {}).items())
    print(f"wrote {args.output}: {plugin.describe()}")
    print(f"held-out KL {t['val_kl_initial']:.4f} -> {t['val_kl']:.4f}; continuation perplexity rise by prompt "
          f"length: {rises}; {t['wall_s']:.0f} s on {t['threads']} threads")
    return 0


def cmd_eval(args) -> int:
    import torch

    from sparseflash.eval.plugins_eval import PluginEvalParams, evaluate_plugins, save_plot

    if args.threads:
        torch.set_num_threads(args.threads)

    params = PluginEvalParams(prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
                              windows=args.windows, stream_windows=args.stream_windows, budget=args.budget)
    result = evaluate_plugins(args.model, args.plugin, args.corpus, params, args.layout, quiet=args.json)
    if args.output:
        import os

        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output)
    if args.plot:
        save_plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    """The eval table as text, with Variator's figures underneath."""
    s = result["settings"]
    lines = [f"{s['windows']} windows of {s['prompt_tokens']} prompt + {s['continuation_tokens']} continuation "
             f"tokens from {s['corpus']}",
             "| ratio | layer | positions | prefill GFLOP | FLOPs saved | prefill ms | streamed prefill neurons "
             "| streamed prefill FFN read | KV bytes | cont. ppl | ppl rise | KL | greedy agree (prefix) | top-1 agree "
             "| plugin params |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ffn = neurons = "-"
        if r.get("prefill_ffn_bytes") is not None:
            ffn = f"{fmt_bytes(r['prefill_ffn_bytes'])} ({-100 * r.get('prefill_ffn_bytes_saved', 0.0):+.0f}%)"
            neurons = f"{r['prefill_neurons']:.0f} ({-100 * r.get('prefill_neurons_saved', 0.0):+.0f}%)"
        lines.append(
            f"| {r['ratio']} | {'-' if r['layer'] is None else r['layer']} | {r['prompt_positions_after']} | "
            f"{r['prefill_flops'] / 1e9:.3f} | {100 * r['prefill_flops_saved']:.1f}% | {r['prefill_ms']:.1f} | {neurons} | {ffn} | "
            f"{fmt_bytes(r['kv_bytes'])} ({-100 * r['kv_bytes_saved']:+.0f}%) | {r['continuation_ppl']:.3f} | "
            f"{100 * r['ppl_rise']:+.2f}% | {r['kl_to_uncompressed']:.4f} | {100 * r['greedy_agreement']:.1f}% ({r['greedy_prefix_tokens']:.1f}) | {100 * r['top1_agreement']:.1f}% | "
            f"{r['plugin_params']:,} ({100 * r['plugin_param_share']:.2f}%) |")
    t = result["truncated"]
    lines.append(f"prompt cut to its last {t['kept_tokens']} tokens (no plugin): cont. ppl {t['continuation_ppl']:.3f} "
                 f"({100 * t['ppl_rise']:+.2f}%), KL {t['kl_to_uncompressed']:.4f}, greedy agreement "
                 f"{100 * t['greedy_agreement']:.1f}% ({t['greedy_prefix_tokens']:.1f}), top-1 agreement {100 * t['top1_agreement']:.1f}%")
    v = result["variator"]
    lines.append(f"Variator (T5-base, reported): {100 * v['flops_saved']:.0f}% computation saved, "
                 f"{100 * v['param_share']:.1f}% extra parameters, quality drop {v['quality_drop']}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from dataclasses import asdict

    from sparseflash.model.plugin import read_plugin_file

    pf, tensors = read_plugin_file(args.plugin)
    params = sum(t.numel() for t in tensors.values())
    if args.json:
        print(json.dumps({**asdict(pf.spec), "parameters": params, "quality": pf.quality, "training": pf.training}))
        return 0
    s = pf.spec
    print(f"plugin:   ratio {s.ratio} after layer {s.layer}, tail {s.tail}, rank {s.rank}, rotary position {s.rope}")
    print(f"model:    hidden {s.hidden_size}, source checkpoint {s.source_hash}")
    print(f"size:     {params:,} parameters ({fmt_bytes(4 * params)} in f32)")
    for n, r in pf.quality.get("ppl_rise", {}).items():
        print(f"held-out: {n}-token prompts, continuation perplexity {100 * r:+.2f}%")
    return 0


def register(sub) -> None:
    from sparseflash.tools.cmd_model import model_arg

    p = sub.add_parser("plugins", help="compression plugins: train, measure, inspect")
    ps = p.add_subparsers(dest="plugins_command", required=True)

    t = ps.add_parser("train", help="train a plugin of ratio K with the model frozen (distils the uncompressed model)")
    model_arg(t)
    t.add_argument("--corpus", required=True, help="training text (plain or .zst); its last 10%% is held out")
    t.add_argument("--ratio", type=int, required=True, help="prompt tokens per compressed vector")
    t.add_argument("--layer", type=int, default=0, help="compress after this layer (0-based)")
    t.add_argument("--tail", type=int, default=16, help="last prompt tokens kept uncompressed (at least)")
    t.add_argument("--rank", type=int, default=32, help="bottleneck width of the plugin's MLP")
    t.add_argument("--rope", choices=["last", "mean"], default="mean",
                   help="rotary position of a compressed vector: its group's last token's or the mean")
    t.add_argument("--prompt-tokens", type=int, default=256, help="longest training prompt")
    t.add_argument("--min-prompt-tokens", type=int, default=128, help="shortest training prompt")
    t.add_argument("--continuation-tokens", type=int, default=64)
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("-o", "--output", required=True, help="plugin file (name it *.plugin.safetensors)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    e = ps.add_parser("eval", help="one table: prefill FLOPs/time/FFN bytes, KV bytes, perplexity, agreement by ratio")
    model_arg(e)
    e.add_argument("--plugin", nargs="+", required=True, metavar="P", help="plugin files (ratio 1 is always measured)")
    e.add_argument("--corpus", required=True, help="held-out text (plain or .zst)")
    e.add_argument("--layout", default=None, help=".sflash layout: also measure streamed-prefill FFN bytes")
    e.add_argument("--budget", default="25%ffn", help="the streamed engine's budget")
    e.add_argument("--prompt-tokens", type=int, default=256)
    e.add_argument("--continuation-tokens", type=int, default=64)
    e.add_argument("--windows", type=int, default=32)
    e.add_argument("--stream-windows", type=int, default=8)
    e.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    e.add_argument("-o", "--output", default=None, help="save the result as JSON")
    e.add_argument("--plot", default=None, help="save a PNG plot")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = ps.add_parser("info", help="a plugin file's metadata and stored held-out quality")
    i.add_argument("plugin")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
