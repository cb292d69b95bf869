"""CLI: ``sparseflash predictors``."""

from __future__ import annotations

import json

from sparseflash.layout.params import THRESHOLD_SETS, PredictorParams, TrainParams
from sparseflash.paths import input_folder, input_model, output_dir


def cmd_predictors(args) -> int:
    from sparseflash.layout.predictors_build import build_predictors
    from sparseflash.layout.predictors_report import parse_ranks, report_brief, report_text
    from sparseflash.layout.profile import load_profile
    from sparseflash.model.source import open_source
    from sparseflash.model.text import split_corpus

    params = PredictorParams(tokens=args.tokens, val_tokens=args.val_tokens, ctx=args.ctx, thresholds=args.thresholds,
                             rank=parse_ranks(args.rank), size_share=args.size_share, topk_factor=args.topk_factor,
                             target_recall=args.target_recall, train=TrainParams(epochs=args.epochs))
    input_model(args.model)
    input_folder(args.profile, "profile folder", (".json", ".npz", ".npy"), "; run `sparseflash profile` first")
    output_dir(args.out, "predictors folder")
    profile = load_profile(args.profile)
    with open_source(args.model) as source:
        train_ids, val_ids = split_corpus(args.corpus, source.tokenizer(), args.tokens, args.val_tokens, args.val_text)
        r = build_predictors(source, profile, args.profile, train_ids, val_ids, args.out, params,
                             source.content_hash(), quiet=args.json)
    print(json.dumps(report_brief(r)) if args.json else report_text(r, args.out))
    return 0


def register(sub) -> None:
    d = PredictorParams
    p = sub.add_parser("predictors", help="train per-layer activation predictors")
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled tiny-relu2)")
    p.add_argument("--profile", required=True, help="profile directory (from `sparseflash profile`)")
    p.add_argument("--corpus", required=True, help="training text (plain or .zst)")
    p.add_argument("--val-text", default=None, help="held-out text (default: corpus tokens after the training ones)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training tokens")
    p.add_argument("--val-tokens", type=int, default=d.val_tokens, help="held-out tokens")
    p.add_argument("--ctx", type=int, default=d.ctx)
    p.add_argument("--thresholds", choices=THRESHOLD_SETS, default=d.thresholds, help="which profile thresholds")
    p.add_argument("--rank", default=str(d.rank), help="predictor rank, or one per layer comma-separated "
                   "(default 0: chosen by measurement at the first layer, from --size-share's rank up to 10%% of the "
                   "FFN values)")
    p.add_argument("--size-share", type=float, default=d.size_share, help="predictor size / FFN size: the rank chosen with --rank 0 starts here")
    p.add_argument("--topk-factor", type=float, default=d.topk_factor, help="top-k predicts this x the mean active count")
    p.add_argument("--target-recall", type=float, default=d.target_recall, help="recall the threshold cut is tuned for")
    p.add_argument("--epochs", type=int, default=TrainParams.epochs)
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predictors)
