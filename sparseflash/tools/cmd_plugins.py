"""CLI: ``sparseflash plugins train|eval|info`` (compression plugins, docs/plugins.md)."""

from __future__ import annotations

import json

from sparseflash.layout.params import PluginTrainParams as P
from sparseflash.paths import output_file
from sparseflash.units import fmt_bytes


def cmd_train(args) -> int:
    import torch

    from sparseflash.layout.plugin_train import train_plugin_file

    if args.threads:
        torch.set_num_threads(args.threads)
    params = P(ratio=args.ratio, layer=args.layer, tail=args.tail, rank=args.rank, rope=args.rope,
                               prompt_tokens=args.prompt_tokens, min_prompt_tokens=args.min_prompt_tokens,
                               continuation_tokens=args.continuation_tokens, steps=args.steps, batch=args.batch,
                               lr=args.lr, seed=args.seed)
    output_file(args.output, "plugin file")  # before the training, not after it
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

    from sparseflash.eval.plugins_eval import PluginEvalParams, evaluate_plugins, format_table, save_plot

    if args.threads:
        torch.set_num_threads(args.threads)

    params = PluginEvalParams(prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
                              windows=args.windows, stream_windows=args.stream_windows, budget=args.budget)
    for out, what in ((args.output, "JSON result"), (args.plot, "plot")):
        if out:
            output_file(out, what)
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
    t.add_argument("--layer", type=int, default=P.layer, help="compress after this layer (0-based)")
    t.add_argument("--tail", type=int, default=P.tail, help="last prompt tokens kept uncompressed (at least)")
    t.add_argument("--rank", type=int, default=P.rank, help="bottleneck width of the plugin's MLP")
    t.add_argument("--rope", choices=["last", "mean"], default=P.rope,
                   help="rotary position of a compressed vector: its group's last token's or the mean")
    t.add_argument("--prompt-tokens", type=int, default=P.prompt_tokens, help="longest training prompt")
    t.add_argument("--min-prompt-tokens", type=int, default=P.min_prompt_tokens, help="shortest training prompt")
    t.add_argument("--continuation-tokens", type=int, default=P.continuation_tokens)
    t.add_argument("--steps", type=int, default=P.steps)
    t.add_argument("--batch", type=int, default=P.batch)
    t.add_argument("--lr", type=float, default=P.lr)
    t.add_argument("--seed", type=int, default=P.seed)
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
