"""CLI commands over a dense model: run, info, eval-ppl."""

from __future__ import annotations

import json
import os
import sys

from sparseflash.runtime.policy import DEFAULT_EVICTION, EVICTION_POLICIES
from sparseflash.tools.format import fmt_bytes


def _is_layout(path) -> bool:
    return path is not None and str(path).endswith(".sflash")


def cmd_run(args) -> int:
    from sparseflash.model.generate import Sampling

    sampling = Sampling(greedy=args.greedy, temperature=args.temp, top_p=args.top_p, seed=args.seed)
    if _is_layout(args.model):
        return _run_streamed(args, sampling, args.model)
    if args.budget is not None:
        return _run_streamed(args, sampling, _prepared_layout(args.model, quiet=args.json))
    from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir
    from sparseflash.model.generate import generate
    from sparseflash.model.loader import open_dense
    from sparseflash.model.plugin import choose_plugin, load_plugin

    model = open_dense(args.model)
    tok = model.tokenizer
    prompt = tok.encode(args.prompt)
    paths, looked_in = _plugin_files(args, args.model or default_model_dir())
    source = checkpoint_hash(args.model or default_model_dir()) if paths else ""
    plugins = [load_plugin(p, source, model.config.num_layers, model.config.hidden_size) for p in paths]
    plugin = choose_plugin(args.compress, plugins, len(prompt), looked_in)
    result = generate(model.transformer(), prompt, args.n_predict, sampling, stop_at_eos=not args.ignore_eos,
                      plugin=plugin)
    import resource

    _print_result(args, tok, prompt, result,
                  {"engine": "dense", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


def _plugin_files(args, *model_paths) -> tuple[list[str], str]:
    """(plugin files a run loads, where they were looked for): --plugin files, else with --compress
    the ``plugins/`` folders of the model paths (model/plugin.py:plugin_dir)."""
    from sparseflash.model.plugin import find_plugins, plugin_dir

    if args.plugin and args.compress is None:
        from sparseflash.errors import SparseflashError

        raise SparseflashError("--plugin needs --compress K (a ratio) or --compress auto")
    if args.compress is None or str(args.compress).lower() in ("none", "1"):
        return [], ""
    if args.plugin:
        return list(args.plugin), ""
    folders = [plugin_dir(p) for p in model_paths if p is not None]
    return [f for p in model_paths if p is not None for f in find_plugins(p)], " or ".join(folders)


def _prepared_layout(model_path, quiet: bool) -> str:
    """The layout of a checkpoint run with --budget: the bundled model prepares its own on first use;
    other checkpoints need `sparseflash prepare` first."""
    from sparseflash.errors import ArtefactError
    from sparseflash.layout.pipeline import cache_root, prepare_bundled
    from sparseflash.model.checkpoint import checkpoint_hash

    if model_path is None:
        return str(prepare_bundled(quiet=quiet, log=lambda m: print(m, file=sys.stderr)))
    prepared = cache_root() / f"{os.path.basename(os.path.normpath(model_path))}-{checkpoint_hash(model_path)}"
    if not (prepared / "model.sflash").exists():
        raise ArtefactError(f"{model_path}: no prepared layout; run `sparseflash prepare -m {model_path} --corpus "
                            f"TEXT` first, or pass -m MODEL.sflash")
    return str(prepared / "model.sflash")


def _run_streamed(args, sampling, layout_path) -> int:
    from sparseflash.errors import SparseflashError
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.plugin import choose_plugin
    from sparseflash.runtime.session import open_streamed, stream_generate

    if args.budget is None:
        raise SparseflashError("streaming a layout needs --budget (bytes such as 2GiB, or a share such as 40%)")
    checkpoint = None if _is_layout(args.model) else (args.model or default_model_dir())
    paths, looked_in = _plugin_files(args, layout_path, checkpoint)
    model = open_streamed(layout_path, args.budget, verify=args.verify, window=args.window, io=args.io,
                          io_threads=args.io_threads, eviction=args.eviction, strategy=args.strategy,
                          lookahead=not args.no_lookahead, device=args.device, plugins=paths)
    try:
        prompt = model.tokenizer.encode(args.prompt)
        plugin = choose_plugin(args.compress, model.plugins, len(prompt), looked_in)
        result, summary = stream_generate(model, prompt, args.n_predict, sampling, not args.ignore_eos, args.stats,
                                          plugin)
    finally:
        model.close()
    _print_result(args, model.tokenizer, prompt, result, {"engine": "streamed", **summary})
    if not args.json:
        print(f"[streamed: {summary['decode_bytes_per_token'] / 1024:.1f} KiB of FFN read per decoded token = "
              f"{summary['decode_dense_share']:.1%} of dense ({summary['dense_ffn_bytes_per_token'] / 1024:.0f} KiB), "
              f"{summary['requests']} requests, hit rate {summary['hit_rate']:.1%}, I/O wait "
              f"{summary['io_wait_s'] * 1e3:.0f} ms, budget {fmt_bytes(summary['budget_bytes'])}, "
              f"peak RSS {fmt_bytes(summary['peak_rss_bytes'])}]", file=sys.stderr)
    return 0


def _print_result(args, tok, prompt, result, extra: dict) -> None:
    text = tok.decode(result.tokens)
    if args.json:
        print(json.dumps({
            "text": text,
            "tokens": result.tokens,
            "prompt_tokens": len(prompt),
            "tokens_per_s": result.tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "prefill_ms": result.prefill_s * 1e3,
            "stopped_at_eos": result.stopped_at_eos,
            "compression": result.compression,
            **extra,
        }))
        return
    print(args.prompt + text)
    if result.compression is not None:
        c = result.compression
        print(f"[prompt compressed x{c['ratio']} after layer {c['layer']}: {c['prompt_positions']} -> "
              f"{c['compressed_positions']} positions in later layers]", file=sys.stderr)
    elif args.compress is not None and str(args.compress).lower() == "auto":
        print(f"[--compress auto: no plugin chosen for a {len(prompt)}-token prompt (rule: docs/plugins.md)]",
              file=sys.stderr)
    print(f"[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s "
          f"(decode {result.decode_tokens_per_s:.1f} tokens/s, prefill {result.prefill_s * 1e3:.0f} ms), "
          f"{extra['engine']}]", file=sys.stderr)


def cmd_info(args) -> int:
    from sparseflash.model.loader import model_summary, open_dense

    model = open_dense(args.model)
    s = model_summary(model.config, model.weights)
    s["source"] = str(model.source)
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"model:        {s['source']}")
    print(f"architecture: {s['arch']} ({s['ffn_kind']} FFN, {s['norm']}, rotary dim {s['rotary_dim']})")
    print(f"shape:        {s['layers']} layers, hidden {s['hidden_size']}, {s['ffn_neurons']} FFN neurons/layer, "
          f"{s['heads']} heads ({s['kv_heads']} kv) of {s['head_dim']}, vocab {s['vocab_size']}, "
          f"context {s['context']}")
    print(f"parameters:   {s['parameters']:,} ({s['ffn_share']:.1%} in FFNs), tied embeddings: {s['tied_embeddings']}")
    print(f"FFN bytes:    {fmt_bytes(s['ffn_bytes_per_layer']['f16'])}/layer in f16, "
          f"{fmt_bytes(s['ffn_bytes_per_layer']['f32'])}/layer in f32; bundle {s['bundle_bytes']['f16']} B (f16)")
    return 0


def cmd_eval_ppl(args) -> int:
    from sparseflash.model.loader import open_dense
    from sparseflash.model.perplexity import perplexity
    from sparseflash.model.text import read_text

    model = open_dense(args.model)
    ids = model.tokenizer.encode(read_text(args.text))
    r = perplexity(model.transformer(), ids, ctx=args.ctx, max_tokens=args.tokens, progress=not args.json)
    if args.json:
        print(json.dumps({"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "ctx": r.ctx}))
    else:
        print(f"perplexity {r.ppl:.3f} over {r.tokens} predicted tokens ({r.windows} windows of {r.ctx})")
    return 0


def model_arg(sp):
    sp.add_argument("-m", "--model", default=None, help="checkpoint folder, .gguf or .sflash layout (default: the bundled tiny-relu2)")


def register(sub) -> None:

    r = sub.add_parser("run", help="generate text from a prompt")
    model_arg(r)
    r.add_argument("-p", "--prompt", default="The os module")
    r.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    r.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    r.add_argument("--temp", type=float, default=0.8)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--budget", default=None, help="stream under this memory budget: bytes (2GiB), a share of the "
                   "model (40%%) or of its FFN bytes for hot region + cache (25%%ffn); without it, run dense")
    r.add_argument("--window", type=int, default=4, help="tokens whose neurons are protected from eviction")
    r.add_argument("--eviction", choices=list(EVICTION_POLICIES), default=DEFAULT_EVICTION,
                   help="beyond the window: lru, lfu, predicted (lowest predictor score first) or window "
                        "(drop everything outside the window)")
    r.add_argument("--strategy", choices=["topk", "threshold", "all"], default=None,
                   help="active-set prediction (default: the layout's)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--io", choices=["direct", "buffered"], default="direct")
    r.add_argument("--io-threads", type=int, default=4)
    r.add_argument("--no-lookahead", action="store_true", help="do not prefetch the next layer's bundles")
    r.add_argument("--verify", action="store_true", help="verify the layout's checksums before running")
    r.add_argument("--stats", default=None, help="save per-token statistics to this JSON file")
    r.add_argument("--compress", default=None, metavar="K|auto",
                   help="compress the prompt with a plugin of ratio K, or pick one by prompt length (auto); "
                        "plugins come from --plugin or plugins/ beside the layout or in the checkpoint")
    r.add_argument("--plugin", nargs="+", default=None, metavar="P", help="compression plugin files")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="architecture, sizes and FFN bytes per layer")
    model_arg(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval-ppl", help="perplexity on a text file (plain or .zst)")
    model_arg(e)
    e.add_argument("--text", required=True)
    e.add_argument("--tokens", type=int, default=None, help="use the first N tokens")
    e.add_argument("--ctx", type=int, default=256, help="window length in tokens")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_ppl)
