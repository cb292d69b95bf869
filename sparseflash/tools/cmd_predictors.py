"""CLI: ``sparseflash predictors``."""

from __future__ import annotations

import json


def cmd_predictors(args) -> int:
    from sparseflash.layout.predictor import TrainParams
    from sparseflash.layout.predictors_build import PredictorParams, build_predictors
    from sparseflash.layout.profile import load_profile
    from sparseflash.model.checkpoint import checkpoint_hash
    from sparseflash.model.loader import open_dense
    from sparseflash.model.text import corpus_ids

    model = open_dense(args.model)
    profile = load_profile(args.profile)
    from sparseflash.errors import SparseflashError

    try:
        ranks = tuple(int(r) for r in args.rank.split(","))
    except ValueError:
        raise SparseflashError(f"--rank {args.rank!r}: give one integer or one per layer, comma-separated") from None
    params = PredictorParams(tokens=args.tokens, val_tokens=args.val_tokens, ctx=args.ctx,
                             thresholds=args.thresholds, rank=ranks[0] if len(ranks) == 1 else ranks, size_share=args.size_share,
                             topk_factor=args.topk_factor, target_recall=args.target_recall,
                             train=TrainParams(epochs=args.epochs))
    if args.val_text:
        train_ids = corpus_ids(args.corpus, model.tokenizer, args.tokens)
        val_ids = corpus_ids(args.val_text, model.tokenizer, args.val_tokens)
    else:
        ids = corpus_ids(args.corpus, model.tokenizer, args.tokens + args.val_tokens)
        train_ids, val_ids = ids[: args.tokens], ids[args.tokens :]
    r = build_predictors(model, profile, args.profile, train_ids, val_ids, args.out, params,
                         checkpoint_hash(model.source), quiet=args.json)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("recall_curves", "threshold_values")}))
        return 0
    m = r["mean"]
    print(f"predictors -> {args.out} (rank {m['rank']:.0f}, {r['size_share']:.2%} of FFN values; "
          f"trained in {r['train_seconds']:.1f} s on {r['train_tokens']} tokens)")
    print(f"  held-out ({r['val_tokens']} tokens), true sparsity {m['true_sparsity']:.1%}")
    print(f"  top-k:     recall {m['recall_topk']:.4f}, prediction sparsity {m['sparsity_topk']:.1%}")
    print(f"  threshold: recall {m['recall_threshold']:.4f}, prediction sparsity {m['sparsity_threshold']:.1%}")
    if r["lookahead_mean"]:
        a = r["lookahead_mean"]
        print(f"  look-ahead: top-k recall {a['recall_topk']:.4f} at {a['sparsity_topk']:.1%}, "
              f"threshold recall {a['recall_threshold']:.4f} at {a['sparsity_threshold']:.1%}")
    p = r["ppl"]
    print(f"  perplexity: dense {p['dense']:.3f}, oracle {p['oracle']:.3f}, predicted top-k "
          f"{p['predicted_topk']:.3f}, predicted threshold {p['predicted_threshold']:.3f} "
          f"(runtime default: {r['strategy']}, {r['predicted_over_true']:.2f}x the true active count)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("predictors", help="train per-layer activation predictors")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--profile", required=True, help="profile directory (from `sparseflash profile`)")
    p.add_argument("--corpus", required=True, help="training text (plain or .zst)")
    p.add_argument("--val-text", default=None, help="held-out text (default: corpus tokens after the training ones)")
    p.add_argument("--tokens", type=int, default=40_960, help="training tokens")
    p.add_argument("--val-tokens", type=int, default=8192, help="held-out tokens")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--thresholds", choices=["ppl", "cett"], default="ppl", help="which profile thresholds")
    p.add_argument("--rank", default="0", help="predictor rank, or one per layer comma-separated "
                   "(default 0: from --size-share)")
    p.add_argument("--size-share", type=float, default=0.025, help="predictor size / FFN size")
    p.add_argument("--topk-factor", type=float, default=2.0, help="top-k predicts this x the mean active count")
    p.add_argument("--target-recall", type=float, default=0.99, help="recall the threshold cut is tuned for")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predictors)
