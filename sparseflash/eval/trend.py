"""``sparseflash sparsity-trend``: the activation ratio of a series of checkpoints and the Sparsing
Law fitted to it.

Two kinds of series:
- over training (``mode="tokens"``): checkpoints of one model at increasing token counts; the
  activation ratio A = 1 - sparsity is fitted by the paper's law for the activation (logspace power
  law for ReLU / ReLU², power law for SiLU / GELU; ``eval/lawfit.py``);
- over shape (``mode="width-depth"``): checkpoints of one parameter budget at several width/depth
  ratios (hidden size / layers); A vs the ratio is fitted by two line segments, the breakpoint being
  the bottleneck.

Each checkpoint is measured as ``sparseflash profile`` measures it (docs/figures.md): per layer, the
CETT threshold search on the calibration tokens, then the PPL-p% search on held-out tokens
(``layout/pplp.py``); the activation ratio is the share of active (token, neuron) pairs on the
calibration tokens at the PPL-p% thresholds (``activation_ratio``) and at a fixed CETT bound
(``activation_ratio_cett``). Peak memory: one model plus the calibration tokens' activations.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.errors import CheckpointError, SparseflashError
from sparseflash.eval import lawfit
from sparseflash.layout import stats
from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.artefacts import write_dir_atomically
from sparseflash.layout.params import check_float, check_int
from sparseflash.layout.pplp import in_memory_ppl, ppl_p_search
from sparseflash.model.config import ModelConfig, config_from_hf
from sparseflash.model.loader import DenseModel, model_summary, open_dense
from sparseflash.model.perplexity import windows
from sparseflash.model.source import open_source
from sparseflash.model.text import corpus_ids
from sparseflash.model.tokenizer import TextTokenizer

TREND_VERSION = 1
MODES = ("tokens", "width-depth")
TRAINING_JSON = "training.json"  # {"tokens_trained": N, ...}, written by bench/train_series.py
TRAINER_STATE = "trainer_state.json"  # Hugging Face Trainer: {"num_input_tokens_seen": N, ...}
FORM_BY_ACTIVATION = {"relu": "logspace", "relu2": "logspace", "silu": "power", "gelu": "power",
                      "gelu_tanh": "power"}


@dataclass(frozen=True)
class TrendParams:
    tokens: int = 16384  # calibration tokens: threshold search and measured activation ratios
    ctx: int = 256  # window length (tokens)
    cett_bound: float = 0.2  # the fixed CETT bound of activation_ratio_cett
    ppl_p: float = 1.0  # percent perplexity rise allowed
    ppl_tokens: int = 8192  # held-out tokens for the PPL-p% search
    ppl_steps: int = 10  # bisection steps on the common CETT bound
    candidates: int = 1000  # magnitude quantiles tried as thresholds
    batch: int = 8  # windows per forward pass

    def __post_init__(self):
        check_int("--tokens", self.tokens, 1)
        check_int("--ctx", self.ctx, 2)
        check_float("--cett", self.cett_bound, 0, 1)
        check_float("--p", self.ppl_p, 0, math.inf, lo_open=True, hi_open=True)
        check_int("--ppl-tokens", self.ppl_tokens, 1)
        check_int("--ppl-steps", self.ppl_steps, 0)
        check_int("candidates", self.candidates, 1)
        check_int("batch", self.batch, 1)


@dataclass(frozen=True)
class SeriesEntry:
    path: Path
    config: ModelConfig
    tokens_trained: int | None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return out


def tokens_from_metadata(path: str | os.PathLike) -> int | None:
    """Training tokens recorded in a checkpoint folder (training.json, else trainer_state.json), or None."""
    path = Path(path)
    for name, key in ((TRAINING_JSON, "tokens_trained"), (TRAINER_STATE, "num_input_tokens_seen")):
        file = path / name
        if path.is_dir() and file.exists():
            value = _read_json(file).get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
            if value is not None and not (isinstance(value, int) and value == 0):
                raise CheckpointError(f"{file}: {key} must be a positive integer, got {value!r}")
    return None


def _describe(path: Path) -> tuple[ModelConfig, str]:
    """(config, canonical tokenizer JSON) without loading the weights of a checkpoint folder."""
    if str(path).endswith(".gguf"):
        model = open_dense(path)
        return model.config, model.tokenizer.to_json()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json not found")
    config = config_from_hf(_read_json(path / "config.json"))
    return config, TextTokenizer.from_file(path / "tokenizer.json").to_json()


def check_series(paths: list[str | os.PathLike], tokens_trained: list[int] | None, mode: str,
                 params: TrendParams) -> list[SeriesEntry]:
    """Validate a series before measuring anything: size, tokenizers, activations, token counts."""
    if mode not in MODES:
        raise SparseflashError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    if len(paths) < 2:
        raise SparseflashError(f"sparsity-trend needs a series of checkpoints, got {len(paths)}")
    if tokens_trained is not None and len(tokens_trained) != len(paths):
        raise SparseflashError(f"--tokens-trained has {len(tokens_trained)} counts for {len(paths)} checkpoints")
    entries, first_tok = [], None
    for i, raw in enumerate(paths):
        path = Path(raw)
        config, tok = _describe(path)
        first = entries[0] if entries else None
        if first is None:
            first_tok = tok
        elif config.vocab_size != first.config.vocab_size:
            raise SparseflashError(f"{path}: vocabulary of {config.vocab_size} tokens, but {first.path} has "
                                   f"{first.config.vocab_size}; a series shares one tokenizer")
        elif tok != first_tok:
            raise SparseflashError(f"{path}: tokenizer.json differs from {first.path}'s; a series shares one tokenizer")
        elif config.activation != first.config.activation:
            raise SparseflashError(f"{path}: activation {config.activation}, but {first.path} has "
                                   f"{first.config.activation}; a series has one activation")
        if params.ctx > config.max_position_embeddings:
            raise SparseflashError(f"{path}: --ctx {params.ctx} is longer than the model's context "
                                   f"({config.max_position_embeddings}); lower --ctx")
        count = tokens_trained[i] if tokens_trained is not None else tokens_from_metadata(path)
        if count is not None and count <= 0:
            raise SparseflashError(f"{path}: token count must be > 0, got {count}")
        entries.append(SeriesEntry(path, config, count))
    if mode == "tokens":
        for prev, e in zip(entries, entries[1:]):
            for x in (prev, e):
                if x.tokens_trained is None:
                    raise SparseflashError(f"{x.path}: no token count ({TRAINING_JSON} tokens_trained or "
                                           f"{TRAINER_STATE} num_input_tokens_seen); pass --tokens-trained")
            if e.tokens_trained <= prev.tokens_trained:
                raise SparseflashError(f"token counts must increase along the series: {e.path} has "
                                       f"{e.tokens_trained} after {prev.tokens_trained} ({prev.path})")
    return entries


def measure_checkpoint(model: DenseModel, calib: torch.Tensor, heldout_ids: list[int], params: TrendParams,
                       quiet: bool = True) -> dict:
    """Activation ratios (PPL-p% and fixed CETT bound) of one model, per layer and averaged over layers.

    ``calib``: (windows, ctx) calibration token ids; ``heldout_ids``: tokens for the PPL-p% search.
    """
    p, c = params, model.config
    tap = NeuronTap(model.weights)
    hook = {"fn": None}
    net = tap.transformer(c, lambda layer, x, a: hook["fn"](layer, x, a) if hook["fn"] is not None else None)
    sample = [[] for _ in range(c.num_layers)]
    hook["fn"] = lambda layer, x, a: sample[layer].append(a.reshape(-1, a.shape[-1]).clone())
    for i in range(0, len(calib), p.batch):
        net(calib[i : i + p.batch])
    hook["fn"] = None
    searches = []
    for layer in range(c.num_layers):
        searches.append(stats.CettCurve(torch.cat(sample[layer]), model.weights.layers[layer].w_down, p.candidates))
        sample[layer] = None
    cett_thr = [s.threshold_for(p.cett_bound)[0] for s in searches]
    ppl_at, tokens = in_memory_ppl(net, lambda h: hook.__setitem__("fn", h), tap.masking_hook, heldout_ids, p.ctx,
                                   p.ppl_tokens)
    found = ppl_p_search(searches, ppl_at, p.ppl_p, p.ppl_steps, tokens, quiet=quiet)
    layers = [{"layer": i, "activation_ratio": 1.0 - s.sparsity_at(found.thresholds[i]),
               "activation_ratio_cett": 1.0 - s.sparsity_at(cett_thr[i]), "nonzero_ratio": 1.0 - s.sparsity_at(0.0),
               "threshold": found.thresholds[i], "threshold_cett": cett_thr[i]} for i, s in enumerate(searches)]
    mean = lambda key: float(np.mean([e[key] for e in layers]))  # noqa: E731
    return {"activation_ratio": mean("activation_ratio"), "activation_ratio_cett": mean("activation_ratio_cett"),
            "nonzero_ratio": mean("nonzero_ratio"), "ppl_bound": found.bound, "ppl_dense": found.ppl_dense,
            "ppl_at_bound": found.ppl_at_bound, "ppl_tokens": found.tokens, "calibration_tokens": calib.numel(),
            "layers": layers}


def _fit_or_reason(x, y, form: str) -> dict:
    try:
        fit = lawfit.fit_hinge(x, y) if form == "hinge" else lawfit.fit_law(x, y, form)
    except SparseflashError as e:
        return {"form": form, "error": str(e)}
    return fit.to_dict()


def _trend_change(x: list[int], y: list[float], fit: dict) -> dict:
    """Measured and fitted change of A from the first to the last checkpoint."""
    out = {"first": y[0], "last": y[-1], "change": y[-1] - y[0], "relative_change": (y[-1] - y[0]) / y[0] if y[0] else None}
    f = lawfit.LawFit.from_dict(fit)
    a, b = (float(v) for v in f.predict([x[0], x[-1]]))
    out.update(fitted_first=a, fitted_last=b, direction="increasing" if b > a else "decreasing" if b < a else "flat")
    return out


def run_trend(paths: list[str | os.PathLike], corpus: str | os.PathLike, out_dir: str | os.PathLike,
              tokens_trained: list[int] | None = None, params: TrendParams = TrendParams(), form: str = "auto",
              mode: str = "tokens", ppl_text: str | os.PathLike | None = None, quiet: bool = False) -> dict:
    """Measure every checkpoint of a series, fit its law, write ``out_dir`` (trend.json + PNGs). Returns the summary."""
    t_start = time.perf_counter()
    p = params
    if not 0 <= p.cett_bound <= 1:
        raise SparseflashError(f"--cett must be in [0, 1], got {p.cett_bound}")
    if p.ppl_p <= 0:
        raise SparseflashError(f"--p must be > 0, got {p.ppl_p}")
    if form not in ("auto", *lawfit.FORMS):
        raise SparseflashError(f"--form must be auto, logspace or power, got {form!r}")
    if mode == "width-depth" and form != "auto":
        raise SparseflashError("--form chooses the law over training tokens; --width-depth always fits two segments")
    entries = check_series(paths, tokens_trained, mode, p)
    activation = entries[0].config.activation
    if mode == "tokens":
        chosen = FORM_BY_ACTIVATION[activation] if form == "auto" else form
        need = lawfit.min_points(chosen)
    else:
        chosen, need = "hinge", lawfit.min_points("hinge")
        shapes = {e.config.hidden_size / e.config.num_layers for e in entries}
        if len(shapes) < need:
            raise SparseflashError(f"a width/depth fit needs at least {need} distinct width/depth ratios, got {len(shapes)}")
    if len(entries) < need:
        raise SparseflashError(f"a {chosen} fit needs at least {need} checkpoints ({need - 1} parameters + 1), "
                               f"got {len(entries)}")

    first = entries[0].path
    tokenizer = TextTokenizer.from_file(first / "tokenizer.json") if first.is_dir() else open_dense(first).tokenizer
    if ppl_text is not None:
        calib_ids = corpus_ids(corpus, tokenizer, p.tokens)[: p.tokens]
        heldout = corpus_ids(ppl_text, tokenizer, p.ppl_tokens)
    else:
        ids = corpus_ids(corpus, tokenizer, p.tokens + p.ppl_tokens)
        calib_ids, heldout = ids[: p.tokens], ids[p.tokens :]
    if len(calib_ids) < p.tokens:
        raise SparseflashError(f"{corpus}: has {len(calib_ids)} tokens, fewer than --tokens {p.tokens}")
    if len(heldout) < 2 * p.ctx:
        raise SparseflashError(f"the PPL-p% search needs at least {2 * p.ctx} held-out tokens, got {len(heldout)}; "
                               "pass --ppl-text or lower --tokens")
    calib = windows(calib_ids, p.ctx, p.tokens)  # (windows, ctx)

    checkpoints = []
    for e in tqdm(entries, desc="checkpoints", disable=quiet, leave=False):
        with open_source(e.path) as source:
            sizes = model_summary(source)
        model = open_dense(e.path)
        embed = model.config.vocab_size * model.config.hidden_size * (1 if sizes["tied_embeddings"] else 2)
        row = {"path": str(e.path), "tokens_trained": e.tokens_trained, "activation": model.config.activation,
               "layers_count": model.config.num_layers, "hidden_size": model.config.hidden_size,
               "width_depth_ratio": model.config.hidden_size / model.config.num_layers,
               "parameters": sizes["parameters"], "non_embedding_parameters": sizes["parameters"] - embed}
        row.update(measure_checkpoint(model, calib, heldout, p, quiet))
        checkpoints.append(row)
        del model

    summary = {"version": TREND_VERSION, "mode": mode, "activation": activation, "form": chosen,
               "corpus": str(corpus), "ppl_text": str(ppl_text) if ppl_text else None, "params": asdict(p),
               "checkpoints": checkpoints}
    ratio = [c["activation_ratio"] for c in checkpoints]
    if mode == "tokens":
        x = [c["tokens_trained"] for c in checkpoints]
        summary["fits"] = {series: {f: _fit_or_reason(x, [c[key] for c in checkpoints], f) for f in lawfit.FORMS}
                           for series, key in (("ppl", "activation_ratio"), ("cett", "activation_ratio_cett"))}
        summary["fit"] = summary["fits"]["ppl"][chosen]
        summary["fit_cett"] = summary["fits"]["cett"][chosen]
        summary["trend"] = _trend_change(x, ratio, summary["fit"])
    else:
        order = np.argsort([c["width_depth_ratio"] for c in checkpoints], kind="stable")
        summary["checkpoints"] = checkpoints = [checkpoints[i] for i in order]
        x = [c["width_depth_ratio"] for c in checkpoints]
        summary["fit"] = lawfit.fit_hinge(x, [c["activation_ratio"] for c in checkpoints]).to_dict()
        summary["fit_cett"] = _fit_or_reason(x, [c["activation_ratio_cett"] for c in checkpoints], "hinge")
        budget = [c["non_embedding_parameters"] for c in checkpoints]
        summary["budget"] = {"non_embedding_min": min(budget), "non_embedding_max": max(budget),
                             "spread": max(budget) / min(budget) - 1,
                             "tokens_trained": sorted({c["tokens_trained"] for c in checkpoints}, key=lambda t: t or 0)}
    summary["seconds"] = time.perf_counter() - t_start

    def fill(tmp: Path) -> dict:
        from sparseflash.eval.trend_plots import write_trend_plots

        summary["plots"] = [path.name for path in write_trend_plots(tmp, summary)]
        with open(tmp / "trend.json", "w") as f:
            json.dump(summary, f, indent=1)
        return summary

    return write_dir_atomically(out_dir, fill)
