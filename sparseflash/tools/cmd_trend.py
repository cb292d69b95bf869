"""CLI: ``sparseflash sparsity-trend``."""

from __future__ import annotations

import json


def _fmt(fit: dict, key: str) -> str:
    err = fit["stderr"].get(key)
    return f"{fit['params'][key]:.4g}" + (f" ± {err:.2g}" if err is not None else " (± n/a)")


def cmd_trend(args) -> int:
    from sparseflash.eval.trend import TrendParams, run_trend

    params = TrendParams(tokens=args.tokens, ctx=args.ctx, cett_bound=args.cett, ppl_p=args.p,
                         ppl_tokens=args.ppl_tokens, ppl_steps=args.ppl_steps)
    mode = "width-depth" if args.width_depth else "tokens"
    s = run_trend(args.model, args.corpus, args.out, args.tokens_trained, params, args.form, mode, args.ppl_text,
                  quiet=args.json)
    if args.json:
        keys = ("mode", "activation", "form", "fit", "fit_cett", "fits", "trend", "budget", "plots", "seconds")
        out = {k: s[k] for k in keys if k in s}
        out["checkpoints"] = [{k: c[k] for k in ("path", "tokens_trained", "width_depth_ratio", "activation_ratio",
                                                  "activation_ratio_cett", "nonzero_ratio", "ppl_bound", "ppl_dense")}
                              | {"layers": [{k: e[k] for k in ("activation_ratio", "activation_ratio_cett")}
                                            for e in c["layers"]]} for c in s["checkpoints"]]
        print(json.dumps(out))
        return 0
    p = s["params"]
    print(f"sparsity-trend of {len(s['checkpoints'])} {s['activation']} checkpoints -> {args.out}")
    print(f"  {'tokens':>12} {'w/d':>6} {'PPL-' + format(p['ppl_p'], 'g') + '%':>9} {'CETT ' + format(p['cett_bound'], 'g'):>9}"
          f" {'nonzero':>8}  per-layer (PPL-p%)")
    for c in s["checkpoints"]:
        layers = " ".join(f"{e['activation_ratio']:.3f}" for e in c["layers"])
        print(f"  {c['tokens_trained'] or '-':>12} {c['width_depth_ratio']:>6.1f} {c['activation_ratio']:>9.4f} "
              f"{c['activation_ratio_cett']:>9.4f} {c['nonzero_ratio']:>8.4f}  {layers}")
    fit = s["fit"]
    names = [k for k in fit["params"]]
    print(f"  fit ({fit['form']}): {fit['formula']}")
    print("    " + ", ".join(f"{k} = {_fmt(fit, k)}" for k in names) + f"; R² = {fit['r2']}")
    if s["mode"] == "tokens":
        t = s["trend"]
        limit, err = fit["limit_ratio"], fit["limit_ratio_stderr"]
        limit_text = "diverges" if limit is None else f"{limit:.4g}" + (f" ± {err:.2g}" if err is not None else "")
        print(f"    D in units of {fit['tokens_unit']:.0e} tokens; limit ratio (D -> inf) {limit_text}")
        if fit.get("note"):
            print(f"    note: {fit['note']}")
        print(f"    measured {t['first']:.4f} -> {t['last']:.4f} ({t['relative_change']:+.1%}); fitted {t['direction']}")
    else:
        b = s["budget"]
        print(f"    bottleneck (width/depth) = {_fmt(fit, 'breakpoint')}; non-embedding parameters "
              f"{b['non_embedding_min']}..{b['non_embedding_max']} (spread {b['spread']:.1%})")
    print(f"  plots: {', '.join(s['plots'])}; {s['seconds']:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sparsity-trend", help="activation ratio over a series of checkpoints, with the Sparsing Law fit")
    p.add_argument("-m", "--model", nargs="+", required=True, help="checkpoints of the series, in training order")
    p.add_argument("--corpus", required=True, help="calibration text (plain or .zst)")
    p.add_argument("--tokens-trained", type=int, nargs="+", default=None,
                   help="training tokens of each checkpoint (default: training.json / trainer_state.json)")
    p.add_argument("--p", type=float, default=1.0, help="allowed perplexity rise (%%) of the PPL-p%% ratio")
    p.add_argument("--cett", type=float, default=0.2, help="the fixed CETT bound of the second ratio")
    p.add_argument("--form", choices=("auto", "logspace", "power"), default="auto",
                   help="law to fit (auto: logspace for ReLU/ReLU², power for SiLU/GELU)")
    p.add_argument("--width-depth", action="store_true",
                   help="checkpoints of one budget at several width/depth ratios: piecewise-linear fit, bottleneck")
    p.add_argument("--ppl-text", default=None, help="held-out text for the PPL-p%% search "
                   "(default: the corpus tokens after the calibration tokens)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (threshold search and ratios)")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="held-out tokens for the PPL-p%% search")
    p.add_argument("--ppl-steps", type=int, default=10, help="bisection steps of the PPL-p%% search")
    p.add_argument("--ctx", type=int, default=256, help="window length (tokens)")
    p.add_argument("-o", "--out", default="sparsity-trend", help="output directory (trend.json, PNG plots)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_trend)
