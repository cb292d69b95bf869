"""CLI: ``sparseflash profile``."""

from __future__ import annotations

import json


def cmd_profile(args) -> int:
    from sparseflash.errors import SparseflashError
    from sparseflash.layout.profile import ProfileParams, run_profile
    from sparseflash.model.checkpoint import checkpoint_hash
    from sparseflash.model.loader import open_dense
    from sparseflash.model.text import corpus_ids

    model = open_dense(args.model)
    params = ProfileParams(tokens=args.tokens, ctx=args.ctx, cett_bound=args.cett, ppl_p=args.ppl_p,
                           cett_tokens=args.cett_tokens, ppl_tokens=args.ppl_tokens, ppl_steps=args.ppl_steps)
    if args.ppl_text:
        calib = corpus_ids(args.corpus, model.tokenizer, args.tokens)
        heldout = corpus_ids(args.ppl_text, model.tokenizer, args.ppl_tokens)
    else:
        ids = corpus_ids(args.corpus, model.tokenizer, args.tokens + args.ppl_tokens)
        calib, heldout = ids[: args.tokens], ids[args.tokens :]
    if len(calib) < args.tokens:
        raise SparseflashError(f"{args.corpus}: has {len(calib)} tokens, fewer than --tokens {args.tokens}")
    s = run_profile(model, calib, heldout, args.out, params, checkpoint_hash(model.source), quiet=args.json)
    if args.json:
        keys = ["sparsity", "cett_bound", "mean_cett", "ppl_p", "ppl_p_sparsity", "ppl_bound", "ppl_dense",
                "ppl_at_bound", "tokens", "exact_zero_share", "reuse", "coact_gap", "hot10_share", "seconds"]
        out = {k: s[k] for k in keys}
        out["layers"] = [{k: e[k] for k in ("threshold", "sparsity", "mean_cett", "reuse", "coact_gap",
                                              "hot10_share", "activation_ratio")} for e in s["layers"]]
        print(json.dumps(out))
        return 0
    print(f"profile of {model.source} on {s['tokens']} tokens -> {args.out}")
    print(f"  sparsity at CETT {s['cett_bound']}: {s['sparsity']:.1%} (mean CETT {s['mean_cett']:.3f}; "
          f"exact zeros {s['exact_zero_share']:.1%})")
    print(f"  PPL+{s['ppl_p']}% sparsity: {s['ppl_p_sparsity']:.1%} at CETT bound {s['ppl_bound']:.4f} "
          f"(ppl {s['ppl_dense']:.3f} -> {s['ppl_at_bound']:.3f})")
    print("  reuse ratio: " + ", ".join(f"k={k}: {v:.3f}" for k, v in s["reuse"].items()))
    print(f"  co-activation gap {s['coact_gap']:.3f}; 10% hottest neurons cover {s['hot10_share']:.1%} of activations")
    print(f"  {s['seconds']:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("profile", help="activation statistics on a calibration corpus")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--corpus", required=True, help="calibration text (plain or .zst)")
    p.add_argument("--tokens", type=int, default=50_000, help="calibration tokens")
    p.add_argument("--cett", type=float, default=0.2, help="CETT bound of the analysis thresholds")
    p.add_argument("--ppl-p", type=float, default=1.0, help="allowed perplexity rise (%%) for the PPL-p%% thresholds")
    p.add_argument("--ppl-text", default=None, help="held-out text for the PPL-p%% search "
                   "(default: the corpus tokens after the calibration tokens)")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="held-out tokens for the PPL-p%% search")
    p.add_argument("--cett-tokens", type=int, default=16384, help="tokens sampled for the threshold search")
    p.add_argument("--ppl-steps", type=int, default=10, help="bisection steps of the PPL-p%% search")
    p.add_argument("--ctx", type=int, default=256, help="window length (tokens)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_profile)
