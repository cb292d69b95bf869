"""CLI: ``sparseflash profile``."""

from __future__ import annotations

import json

from sparseflash.layout.params import ProfileParams
from sparseflash.paths import input_model, output_dir


def cmd_profile(args) -> int:
    from sparseflash.layout.profile import profile_brief, profile_text, run_profile
    from sparseflash.model.source import open_source
    from sparseflash.model.text import split_corpus

    params = ProfileParams(tokens=args.tokens, ctx=args.ctx, cett_bound=args.cett, ppl_p=args.ppl_p,
                           cett_tokens=args.cett_tokens, ppl_tokens=args.ppl_tokens, ppl_steps=args.ppl_steps)
    input_model(args.model)
    output_dir(args.out, "profile folder")
    with open_source(args.model) as source:
        calib, heldout = split_corpus(args.corpus, source.tokenizer(), args.tokens, args.ppl_tokens, args.ppl_text)
        s = run_profile(source, calib, heldout, args.out, params, source.content_hash(), quiet=args.json)
    print(json.dumps(profile_brief(s)) if args.json else profile_text(s, str(source.path), args.out))
    return 0


def register(sub) -> None:
    d = ProfileParams
    p = sub.add_parser("profile", help="activation statistics on a calibration corpus")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--corpus", required=True, help="calibration text (plain or .zst)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="calibration tokens")
    p.add_argument("--cett", type=float, default=d.cett_bound, help="CETT bound of the analysis thresholds")
    p.add_argument("--ppl-p", type=float, default=d.ppl_p, help="allowed perplexity rise (%%) for the PPL-p%% thresholds")
    p.add_argument("--ppl-text", default=None, help="held-out text for the PPL-p%% search "
                   "(default: the corpus tokens after the calibration tokens)")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens, help="held-out tokens for the PPL-p%% search")
    p.add_argument("--cett-tokens", type=int, default=d.cett_tokens, help="tokens sampled for the threshold search")
    p.add_argument("--ppl-steps", type=int, default=d.ppl_steps, help="bisection steps of the PPL-p%% search")
    p.add_argument("--ctx", type=int, default=d.ctx, help="window length (tokens)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_profile)
