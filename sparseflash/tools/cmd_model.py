"""CLI commands over a model: run (dense or streamed), info, eval-ppl."""

from __future__ import annotations

import argparse
import json
import sys

from sparseflash.paths import input_file, input_model, output_file
from sparseflash.runtime.policy import EVICTION_POLICIES, Budget, Policy, check_lookahead_raise


def _is_layout(path) -> bool:
    return path is not None and str(path).endswith(".sflash")


def cmd_run(args) -> int:
    from sparseflash.model.generate import Sampling

    sampling = Sampling(greedy=args.greedy, temperature=args.temp, top_p=args.top_p, seed=args.seed)
    if args.budget is not None:
        Budget.check_text(args.budget)
    _check_inputs(args)
    if args.stats is not None:
        output_file(args.stats, "--stats file")
    if _is_layout(args.model) or args.budget is not None:
        return _run_streamed(args, sampling)
    from sparseflash.model.generate import generate
    from sparseflash.model.loader import open_dense
    from sparseflash.model.plugin import dense_run_plugin

    model = open_dense(args.model, args.tokenizer, lazy=None)  # one layer at a time if it does not fit
    prompt = model.tokenizer.encode(args.prompt)
    plugin = dense_run_plugin(args.compress, args.plugin, args.model, model.config.num_layers,
                              model.config.hidden_size, len(prompt))
    result = generate(model.transformer(), prompt, args.n_predict, sampling, stop_at_eos=not args.ignore_eos,
                      plugin=plugin)
    _print_result(args, model.tokenizer, result, {"engine": "dense"})
    return 0


def _check_inputs(args) -> None:
    """Refuse, before anything is opened, a model or tokenizer that is not a regular file or a folder
    of them (a FIFO would block the open)."""
    input_model(args.model)
    if getattr(args, "tokenizer", None) is not None:
        input_file(args.tokenizer, "tokenizer.json")


def _run_streamed(args, sampling) -> int:
    from sparseflash.errors import SparseflashError
    from sparseflash.layout.pipeline import prepared_layout
    from sparseflash.model.checkpoint import default_model_dir
    from sparseflash.model.plugin import choose_plugin, run_plugin_files
    from sparseflash.runtime.session import open_streamed, stream_generate, summary_line

    if args.tokenizer is not None:
        raise SparseflashError("--tokenizer applies to a checkpoint run dense; a layout carries its own tokenizer")
    if args.budget is None:
        raise SparseflashError("streaming a layout needs --budget (bytes such as 2GiB, or a share such as 40%)")
    check_lookahead_raise(args.lookahead_raise)  # before a first run prepares the model (minutes)
    path = args.model if _is_layout(args.model) else prepared_layout(
        args.model, quiet=args.json, log=lambda m: print(m, file=sys.stderr))
    checkpoint = None if _is_layout(args.model) else (args.model or default_model_dir())
    plugins, looked_in = run_plugin_files(args.compress, args.plugin, [path, checkpoint])
    model = open_streamed(path, args.budget, window=args.window, io=args.io, io_threads=args.io_threads,
                          eviction=args.eviction, strategy=args.strategy, lookahead=args.lookahead,
                          lookahead_raise=args.lookahead_raise, miss_cut=not args.no_miss_cut, device=args.device,
                          verify=not args.no_verify, plugins=plugins, split_cache=not args.even_cache)
    try:
        prompt = model.tokenizer.encode(args.prompt)
        plugin = choose_plugin(args.compress, model.plugins, len(prompt), looked_in)
        result, summary = stream_generate(model, prompt, args.n_predict, sampling, not args.ignore_eos, args.stats,
                                          plugin)
    finally:
        model.close()
    extra = {"engine": "streamed", **summary}
    _print_result(args, model.tokenizer, result, extra)
    if not args.json:
        print(summary_line(extra), file=sys.stderr)
    return 0


def _print_result(args, tok, result, extra: dict) -> None:
    """Print the generation; ``extra`` gets the run's peak RSS, measured last (runtime/rss.py)."""
    from sparseflash.runtime.rss import peak_rss_bytes

    text = tok.decode(result.tokens)
    extra["peak_rss_bytes"] = peak_rss_bytes()
    if args.json:
        print(json.dumps({**result.to_dict(text), **extra}))
        return
    print(args.prompt + text)
    from sparseflash.model.plugin import compression_note

    note = compression_note(result.compression, args.compress, len(result.prompt_tokens))
    if note:
        print(note, file=sys.stderr)
    print(result.speed_line(extra["engine"]), file=sys.stderr)


def cmd_info(args) -> int:
    from sparseflash.model.loader import model_summary, summary_text, type_counts
    from sparseflash.model.source import open_source

    _check_inputs(args)
    with open_source(args.model, args.tokenizer) as source:
        tensors = source.tensor_list()
        s = {**model_summary(source), "source": str(source.path), "tensor_types": type_counts(tensors)}
    print(json.dumps({**s, "tensors": tensors}) if args.json else summary_text(s))
    return 0


def cmd_eval_ppl(args) -> int:
    from sparseflash.model.layerwise import perplexity_layerwise
    from sparseflash.model.source import open_source
    from sparseflash.model.text import read_text

    _check_inputs(args)
    with open_source(args.model, args.tokenizer) as source:
        ids = source.tokenizer().encode(read_text(args.text))
        r = perplexity_layerwise(source, ids, ctx=args.ctx, max_tokens=args.tokens, progress=not args.json)
    if args.json:
        print(json.dumps({"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "ctx": r.ctx}))
    else:
        print(f"perplexity {r.ppl:.3f} over {r.tokens} predicted tokens ({r.windows} windows of {r.ctx})")
    return 0


def model_arg(sp):
    sp.add_argument("-m", "--model", default=None, help="checkpoint folder, .gguf or .sflash layout (default: the bundled tiny-relu2)")


def tokenizer_arg(sp):
    sp.add_argument("--tokenizer", default=None, metavar="TOKENIZER_JSON",
                    help="use this tokenizer.json instead of the checkpoint's own (e.g. for a GGUF whose "
                         "pre-tokenizer cannot be rebuilt)")


def register(sub) -> None:
    r = sub.add_parser("run", help="generate text from a prompt")
    model_arg(r)
    tokenizer_arg(r)
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
    r.add_argument("--window", type=int, default=Policy.window, help="tokens whose neurons are protected from eviction")
    r.add_argument("--eviction", choices=list(EVICTION_POLICIES), default=Policy.eviction,
                   help="beyond the window: frequency (default: predicted probability now + recent use rate, "
                        "lowest first), predicted (lowest predictor score first), forecast, lru, lfu or window "
                        "(drop everything outside the window)")
    r.add_argument("--strategy", choices=["topk", "threshold", "all"], default=Policy.strategy,
                   help="active-set prediction (default: the layout's)")
    r.add_argument("--device", choices=["cpu", "cuda"], default=Policy.device)
    r.add_argument("--io", choices=["direct", "buffered"], default=Policy.io)
    r.add_argument("--io-threads", type=int, default=None,
                   help="reads in flight (default: chosen, with their size, from the disk's measured model)")
    r.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=Policy.lookahead,
                   help="prefetch the next layer's predicted bundles while a layer computes (look-ahead predictors; "
                        "reads more neurons, hides read latency; off by default)")
    r.add_argument("--lookahead-raise", type=float, default=Policy.lookahead_raise, metavar="LOGITS",
                   help="the look-ahead read's cuts sit this many logits above the layer's own: the next layer is "
                        f"read ahead only where the look-ahead is surer (default {Policy.lookahead_raise:g}; 0: as sure "
                        "as the layer's own reads)")
    r.add_argument("--no-miss-cut", action="store_true",
                   help="read every predicted neuron that is not in memory and compute those in memory as predicted "
                        "(ignore the layout's validated miss and cached cuts)")
    r.add_argument("--even-cache", action="store_true",
                   help="every layer the same cache slots (default: the layout's split by each layer's demand; its miss "
                        "cuts were validated with the split, so the quality of an even cache is not)")
    r.add_argument("--no-verify", action="store_true",
                   help="do not check bundles against their digests as they are read, nor resident tensors at load "
                        "(a few %% faster; bytes changed on disk would then run to wrong tokens)")
    r.add_argument("--stats", default=None, help="save per-token statistics to this JSON file")
    r.add_argument("--compress", default=None, metavar="K|auto",
                   help="compress the prompt with a plugin of ratio K, or pick one by prompt length (auto); "
                        "plugins come from --plugin or plugins/ beside the layout or in the checkpoint")
    r.add_argument("--plugin", nargs="+", default=None, metavar="P", help="compression plugin files")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="architecture, sizes, stored tensor types and FFN bytes per layer")
    model_arg(i)
    tokenizer_arg(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval-ppl", help="perplexity on a text file (plain or .zst)")
    model_arg(e)
    tokenizer_arg(e)
    e.add_argument("--text", required=True)
    e.add_argument("--tokens", type=int, default=None, help="use the first N tokens")
    e.add_argument("--ctx", type=int, default=256, help="window length in tokens")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_ppl)
