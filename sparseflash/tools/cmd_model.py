"""CLI commands over a dense model: run, info, eval-ppl."""

from __future__ import annotations

import json
import sys

from sparseflash.tools.format import fmt_bytes


def cmd_run(args) -> int:
    from sparseflash.model.generate import Sampling, generate
    from sparseflash.model.loader import open_dense

    model = open_dense(args.model)
    tok = model.tokenizer
    prompt = tok.encode(args.prompt)
    sampling = Sampling(greedy=args.greedy, temperature=args.temp, top_p=args.top_p, seed=args.seed)
    stream = None if args.json else (lambda t: None)
    result = generate(model.transformer(), prompt, args.n_predict, sampling, stop_at_eos=not args.ignore_eos,
                      on_token=stream)
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
            "engine": "dense",
        }))
    else:
        print(args.prompt + text)
        print(f"[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s "
              f"(decode {result.decode_tokens_per_s:.1f} tokens/s, prefill {result.prefill_s * 1e3:.0f} ms), dense]",
              file=sys.stderr)
    return 0


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
    sp.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")


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
