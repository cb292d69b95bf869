"""``sparseflash predictors``: train every layer's predictor, measure it, save weights and report.

Training pairs come from the calibration corpus, labelled with the profile's thresholds (the PPL-p%
set unless told otherwise). The strategies' knobs (top-k count, score cut) are tuned on a slice
of the training tokens; every reported figure is measured on held-out tokens.

One layer-by-layer pass does it all (calibration.LayerPass). At layer l the training and held-out
windows give their FFN inputs (kept in float16, as they were once spilled to disk) and active masks;
layer l's predictor is trained on them, and so is the look-ahead predictor of l, on layer l-1's
inputs; then three more copies of the held-out windows go through the layer with their FFNs
limited to the true active set (oracle), the top-k and the threshold predictions. Layer l's data
is dropped before l+1 is read; perplexities of the four held-out streams close the pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.layout import miss_mix, predictor_training
from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.artefacts import write_dir_atomically
from sparseflash.layout.cache_demand import cache_split
from sparseflash.layout.calibration import LayerPass
from sparseflash.layout.masks import count_true, pack, packed_width, unpack
from sparseflash.layout.miss_cut import MissRun, miss_stream
from sparseflash.layout.params import PredictorParams
from sparseflash.layout.predictor import (
    Predictor,
    recall_and_sparsity,
    tune_cut,
    tune_miss_cut,
)
from sparseflash.layout.predictor_training import _choose_rank, _split, _train_side_by_side, rank_candidates
from sparseflash.layout.predictors_report import plot_report
from sparseflash.model.perplexity import windows
from sparseflash.model.source import CheckpointSource

PREDICTORS_VERSION = 1
WEIGHTS_FILE = "predictors.safetensors"
REPORT_FILE = "predictors.json"


def _save_weights(path: Path, preds: dict[str, Predictor], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, p in preds.items():
        for name in ("w1", "b1", "w2", "b2"):
            tensors[f"{key}.{name}"] = getattr(p, name).contiguous()
        tensors[f"{key}.topk"] = torch.tensor([p.topk], dtype=torch.int64)
        tensors[f"{key}.cut"] = torch.tensor([p.cut], dtype=torch.float32)
        if p.miss_cuts:
            tensors[f"{key}.miss_cuts"] = torch.tensor(p.miss_cuts, dtype=torch.float32)
        if p.cached_cut is not None:
            tensors[f"{key}.cached_cut"] = torch.tensor([p.cached_cut], dtype=torch.float32)
    save_file(tensors, str(path), metadata={"sparseflash": json.dumps(meta)})


class StoredPredictors(Mapping):
    """The predictors of a safetensors file, keyed ``layer.{l}`` / ``lookahead.{l}``, each read from
    the (memory-mapped) file when asked for and not kept: a reader holds one at a time, however
    many layers there are (all of a 7B shape's are ~0.9 GB in float32)."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(path), framework="pt")
            self.meta = json.loads(self._file.metadata()["sparseflash"])
            names = set(self._file.keys())
        except (SafetensorError, KeyError, TypeError, json.JSONDecodeError, OSError) as e:
            raise ArtefactError(f"{path}: cannot read predictors ({e})") from None
        self.path = path
        self._keys = sorted({k.rsplit(".", 1)[0] for k in names})
        self._names = names
        missing = [f"{k}.{part}" for k in self._keys for part in ("w1", "b1", "w2", "b2", "topk", "cut")
                   if f"{k}.{part}" not in names]
        if missing:
            raise ArtefactError(f"{path}: cannot read predictors (missing {', '.join(missing[:3])})")

    def __getitem__(self, key: str) -> Predictor:
        if key not in self._keys:
            raise KeyError(key)
        t = {part: self._file.get_tensor(f"{key}.{part}") for part in ("w1", "b1", "w2", "b2", "topk", "cut")}
        miss = (tuple(float(v) for v in self._file.get_tensor(f"{key}.miss_cuts"))
                if f"{key}.miss_cuts" in self._names else ())  # files from before cost-aware cuts have none
        cached = (float(self._file.get_tensor(f"{key}.cached_cut")[0]) if f"{key}.cached_cut" in self._names
                  else None)  # nor from before the cut for neurons in memory
        return Predictor(t["w1"], t["b1"], t["w2"], t["b2"], int(t["topk"][0]), float(t["cut"][0]), miss, cached)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_predictors(folder: str | os.PathLike) -> tuple[StoredPredictors, dict]:
    """Predictors keyed ``layer.{l}`` / ``lookahead.{l}`` (read one at a time, when asked for) and
    the metadata saved with them."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        raise ArtefactError(f"{path}: not found; run `sparseflash predictors -o {folder}` first")
    preds = StoredPredictors(path)
    return preds, preds.meta


def _join_parts(parts: Path, path: Path, meta: dict) -> None:
    """The per-layer files of ``parts`` as one predictors file (every predictor in memory for the
    moment it is written: twice their bytes, after the layer pass has let go of its memory)."""
    preds = {}
    for part in sorted(parts.glob("layer_*.safetensors")):
        stored = StoredPredictors(part)
        preds.update({k: stored[k] for k in stored})
    _save_weights(path, preds, meta)
    del preds
    shutil.rmtree(parts)


def _measure(trained: tuple[Predictor, dict], x, mask, p: PredictorParams, x_val, mask_val, tune_mag) -> dict:
    """Set the predictor's k (from the fit slice's mean active count), cut and cost-aware miss cuts (tuned
    on the tune slice, whose neuron magnitudes are ``tune_mag``); its figures on the held-out tokens."""
    pred, log = trained
    fit_x, fit_m, tune_x, tune_m = _split(x, mask, p)
    mean_active = count_true(fit_m) / max(len(fit_m), 1)  # active neurons per token (no (tokens, n) widened copy)
    pred.topk = min(pred.neurons, max(1, math.ceil(p.topk_factor * mean_active)))
    pred.cut = tune_cut(pred, tune_x, tune_m, p.target_recall)
    pred.miss_cuts = tuple(tune_miss_cut(pred, tune_x, tune_m, tune_mag, r) for r in p.miss_recalls)
    pred.cached_cut = min(pred.cut, tune_miss_cut(pred, tune_x, tune_m, tune_mag, p.cached_share))
    r_top, s_top = recall_and_sparsity(pred.predict_topk(x_val), mask_val)
    r_thr, s_thr = recall_and_sparsity(pred.predict_threshold(x_val), mask_val)
    true_sparsity = 1.0 - count_true(mask_val) / max(mask_val.numel(), 1)
    z_val = pred.logits(x_val)
    miss = [recall_and_sparsity(z_val > max(pred.cut, c), mask_val) for c in pred.miss_cuts]
    return {"rank": pred.rank, "topk": pred.topk, "cut": pred.cut, "recall_topk": r_top, "sparsity_topk": s_top,
            "recall_threshold": r_thr, "sparsity_threshold": s_thr, "true_sparsity": true_sparsity,
            "miss_cuts": list(pred.miss_cuts), "cached_cut": pred.cached_cut, "recall_miss": [m[0] for m in miss],
            "sparsity_miss": [m[1] for m in miss], "train_loss": log["train_loss"][-1]}


def _recall_curve(pred: Predictor, x_val, mask_val, points: int = 64) -> dict:
    """Top-k recall vs prediction sparsity on held-out tokens, for k on a log grid."""
    z = pred.logits(x_val)
    ranked = torch.argsort(z, dim=1, descending=True)
    hits = torch.gather(mask_val, 1, ranked).float().sum(0).cumsum(0)
    total = max(float(count_true(mask_val)), 1.0)
    ks = np.unique(np.geomspace(1, pred.neurons, points).round().astype(int))
    return {"sparsity": [1 - k / pred.neurons for k in ks], "recall": [float(hits[k - 1]) / total for k in ks]}


def build_predictors(source: CheckpointSource, profile: dict, profile_dir: str | os.PathLike, train_ids: list[int],
                     val_ids: list[int], out_dir: str | os.PathLike, params: PredictorParams = PredictorParams(),
                     source_hash: str = "", quiet: bool = False) -> dict:
    """Train, measure and save predictors; returns the report (also written as predictors.json)."""
    c, p = source.config, params
    if p.thresholds not in ("ppl", "cett"):
        raise SparseflashError(f"--thresholds must be ppl or cett, got {p.thresholds!r}")
    if profile.get("source_hash") and source_hash and profile["source_hash"] != source_hash:
        raise ArtefactError(f"{profile_dir}: profile was made from checkpoint {profile['source_hash']}, not "
                            f"{source_hash}; re-run `sparseflash profile`")
    thr_file = np.load(Path(profile_dir) / "thresholds.npz")
    thresholds = [float(t) for t in thr_file[p.thresholds]]
    if len(thresholds) != c.num_layers:
        raise ArtefactError(f"{profile_dir}: {len(thresholds)} layers of thresholds, model has {c.num_layers}")
    train = windows(train_ids, p.ctx, p.tokens)
    val = windows(val_ids, p.ctx, p.val_tokens)
    return write_dir_atomically(out_dir, lambda tmp: _build(source, thresholds, train, val, tmp, p, source_hash,
                                                            profile, quiet, profile_dir))


class _Record:
    """One stream's FFN inputs (float16) and packed active masks at the current layer, in memory or
    in a file under ``folder`` when larger than ``spill_bytes``."""

    def __init__(self, tokens: int, d: int, neurons: int, folder: Path, name: str, spill_bytes: int | None,
                 magnitudes_from: int | None = None):
        self.neurons = neurons
        # the neurons' magnitudes (float16) of rows from ``magnitudes_from`` on: the tune slice's, for the
        # contribution-recall cuts (tune_miss_cut)
        self.mag_from = magnitudes_from
        self.mag = None if magnitudes_from is None else np.zeros((tokens - magnitudes_from, neurons), np.float16)
        big = spill_bytes is not None and tokens * (2 * d + packed_width(neurons)) > spill_bytes
        if big:
            folder.mkdir(exist_ok=True)
            self.x = np.lib.format.open_memmap(folder / f"x_{name}.npy", "w+", np.float16, (tokens, d))
            self.mask = np.lib.format.open_memmap(folder / f"mask_{name}.npy", "w+", np.uint8,
                                                  (tokens, packed_width(neurons)))
        else:
            self.x = np.zeros((tokens, d), np.float16)
            self.mask = np.zeros((tokens, packed_width(neurons)), np.uint8)

    def hook(self, tap: NeuronTap):
        def observe(layer, rows, x, a):
            self.x[rows] = x.numpy().astype(np.float16)
            self.mask[rows] = pack(tap.active(layer, a).numpy())
            if self.mag is not None and rows.stop > self.mag_from:
                lo = max(rows.start, self.mag_from)
                self.mag[lo - self.mag_from: rows.stop - self.mag_from] = \
                    tap.magnitude(layer, a[lo - rows.start:]).numpy().astype(np.float16)
            if isinstance(self.x, np.memmap):  # written back now: clean pages the kernel may drop
                self.x.flush()
                self.mask.flush()

        return observe

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs float16 (tokens, d), masks bool (tokens, neurons)); training widens the inputs a
        batch at a time (layout/predictor.train_predictor)."""
        return torch.from_numpy(np.array(self.x)), torch.from_numpy(unpack(self.mask, self.neurons))

    def magnitudes(self) -> torch.Tensor | None:
        return None if self.mag is None else torch.from_numpy(self.mag)


def _build(source, thresholds, train, val, out, p, source_hash, profile, quiet, profile_dir):
    c = source.config
    t0 = time.perf_counter()
    demand, split = cache_split(profile_dir, p, c, quiet)  # candidates are validated with a run's split caches
    candidates = rank_candidates(c.hidden_size, c.intermediate_size, c.ffn_param_count(), p)
    ranks = list(p.rank) if isinstance(p.rank, (tuple, list)) else [p.rank or candidates[0]] * c.num_layers
    rank_choice = None  # rank 0: chosen at the first layer (_choose_rank)
    if len(ranks) != c.num_layers or min(ranks) < 1:
        raise SparseflashError(f"--rank needs one positive rank or {c.num_layers} comma-separated ranks, got {p.rank}")
    if p.rank == 0 and len(candidates) == 1:  # no choice to make: the one rank, spread by active share
        ranks = predictor_training.layer_ranks(candidates[0], profile, p, c.num_layers)
    tap = NeuronTap.layerwise(c.num_layers, thresholds)
    layers, curves, param_counts = [], [], {}
    parts = out / "parts"  # each layer's predictors, saved as soon as trained: none are held
    parts.mkdir()
    train_s = 0.0
    prev = None  # the previous layer's (inputs, held-out inputs): the look-ahead predictors' features
    streams = {"train": train, "dense": val, "oracle": val, "predicted_topk": val, "predicted_threshold": val,
               **{miss_stream(r): val for r in p.miss_recalls},
               **{miss_stream(r, s): val for r in p.miss_recalls for s in p.larger_miss_shares}}
    n_tune = max(1, int(train.numel() * p.tune_share))  # as _split takes it
    probed = miss_mix.probe_windows(val.shape[0], c.num_layers, p.probe_budget if p.miss_recalls else 0.0)
    probes = miss_mix.Probes("predicted_threshold", probed, c.num_layers, p.ctx, split(p.miss_share)) if len(probed) else None
    if probes:  # per-layer miss cuts: layer l's probe branches off the threshold stream at layer l
        streams[miss_mix.PROBE] = miss_mix.probe_seqs(val, probed, c.num_layers)
    probe_cut = int(np.argmin(p.miss_recalls)) if p.miss_recalls else 0  # the probes apply the steepest cut
    miss_runs = {r: MissRun(p.ctx, c.num_layers, split(p.miss_share)) for r in p.miss_recalls}
    larger_runs = {(r, s): MissRun(p.ctx, c.num_layers, split(s)) for r in p.miss_recalls for s in p.larger_miss_shares}
    every_read = MissRun(p.ctx, c.num_layers, split(p.miss_share))  # the threshold stream, counted the same way
    with LayerPass(source, streams, p.batch, "predictors", quiet, p.spill_bytes, out) as lp:
        if probes:
            lp.bar.total -= miss_mix.Probes.untouched_tokens(len(probed), c.num_layers, p.ctx)
        for l, w in lp.layers():
            tap.add_layer(l, w)
            rec = _Record(train.numel(), c.hidden_size, c.intermediate_size, out / "record", "train", p.spill_bytes,
                          magnitudes_from=train.numel() - n_tune)
            rec_val = _Record(val.numel(), c.hidden_size, c.intermediate_size, out / "record", "val", p.spill_bytes)
            lp.run("train", l, w, rec.hook(tap))
            lp.run("dense", l, w, rec_val.hook(tap))
            (x, mask), (x_val, mask_val) = rec.tensors(), rec_val.tensors()
            tune_mag = rec.magnitudes()
            del rec, rec_val
            t = time.perf_counter()
            if p.rank == 0 and rank_choice is None and len(candidates) > 1:
                def tried(j, e, total, l=l):
                    lp.bar.set_postfix_str(f"layer {l + 1}/{c.num_layers}: choosing the rank, "
                                           f"rank {candidates[j]} epoch {e}/{total}")

                chosen, table = _choose_rank(x, mask, candidates, p, tried)
                ranks = predictor_training.layer_ranks(chosen, profile, p, c.num_layers)  # by active share
                rank_choice = {"layer": l, "epochs": p.rank_epochs, "target_recall": p.target_recall,
                               "tolerance": p.rank_tolerance, "candidates": table, "chosen": chosen,
                               "spread": p.rank_spread, "ranks": list(ranks)}
            lp.bar.set_postfix_str(f"layer {l + 1}/{c.num_layers}: training")
            jobs = [(x, mask)] + ([(prev[0], mask)] if p.lookahead and l > 0 else [])
            state = ["training", "look-ahead"][: len(jobs)]
            def epochs(j, e, total, l=l, state=state):  # the bar's postfix moves with the epochs
                state[j] = f"{('training', 'look-ahead')[j]} epoch {e}/{total}"
                lp.bar.set_postfix_str(f"layer {l + 1}/{c.num_layers}: {', '.join(state)}")

            preds = _train_side_by_side(jobs, ranks[l], p, epochs)
            pred = preds[0][0]
            metrics = _measure(preds[0], x, mask, p, x_val, mask_val, tune_mag)
            trained = {f"layer.{l}": pred}
            curves.append(_recall_curve(pred, x_val, mask_val))
            if len(preds) > 1:
                m_ahead = _measure(preds[1], prev[0], mask, p, prev[1], mask_val, tune_mag)
                trained[f"lookahead.{l}"] = preds[1][0]
                metrics["lookahead"] = {k: m_ahead[k] for k in ("topk", "cut", "recall_topk", "sparsity_topk",
                                                                "recall_threshold", "sparsity_threshold",
                                                                "miss_cuts", "cached_cut", "recall_miss",
                                                                "sparsity_miss")}
            train_s += time.perf_counter() - t
            _save_weights(parts / f"layer_{l:04d}.safetensors", trained, {})
            param_counts.update({k: pr.param_count for k, pr in trained.items()})
            del trained
            metrics["layer"] = l
            layers.append(metrics)
            prev = (x, x_val)
            del mask, mask_val, tune_mag
            # quality: every FFN computes only the chosen neurons (exact values for those it computes)
            lp.run("oracle", l, w, lambda i, rows, xx, a: a * tap.active(i, a))
            lp.run("predicted_topk", l, w, lambda i, rows, xx, a, pr=pred: a * pr.predict_topk(xx))
            norms = w.w_down.float().norm(dim=0) if probes else None  # each neuron's down-projection column
            if probes:
                probes.layer(lp, l, w, pred, pred.miss_cuts[probe_cut], norms)
            lp.run("predicted_threshold", l, w, every_read.hook(pred, -math.inf))  # = a * predict_threshold
            for r, cut in zip(p.miss_recalls, pred.miss_cuts):
                lp.run(miss_stream(r), l, w, miss_runs[r].hook(pred, cut, pred.cached_cut, norms))
                for s in p.larger_miss_shares:
                    lp.run(miss_stream(r, s), l, w, larger_runs[r, s].hook(pred, cut, pred.cached_cut, norms))
            del norms
        windows = {name: lp.nll_windows(name) for name in ("dense", "oracle", "predicted_topk", "predicted_threshold")}
        ppl = {name: miss_mix.window_ppl(nll, p.ctx) for name, nll in windows.items()}  # one head pass a stream
        dense_windows = windows["dense"]

        def measured(r, name, run):  # one candidate's held-out stream: perplexity, computed and read neurons
            per_window, per_token = lp.nll_windows(name), run.per_token()
            return {"recall": r, "ppl": miss_mix.window_ppl(per_window, p.ctx),
                    "rise_upper_pct": miss_mix.rise_upper(per_window, dense_windows, p.ctx), "computed_per_token": per_token[0],
                    "read_per_token": per_token[1]}

        # every neuron above the miss cut (nothing in memory), held-out tokens, per layer
        miss = [{**measured(r, miss_stream(r), miss_runs[r]),
                 "strong_share": 1.0 - float(np.mean([m["sparsity_miss"][i] for m in layers])),
                 "strong_recall": float(np.mean([m["recall_miss"][i] for m in layers]))}
                for i, r in enumerate(p.miss_recalls)]
        larger = [{"share": s, "miss": [measured(r, miss_stream(r, s), larger_runs[r, s]) for r in p.miss_recalls]}
                  for s in p.larger_miss_shares]  # the same candidates with larger caches
        probe, plans = None, []
        if probes:  # per-layer miss cuts: each layer's sensitivity, then the mixes to validate
            probe = probes.measure(lp, windows["predicted_threshold"])
            threshold_rise = 100.0 * (ppl["predicted_threshold"] / ppl["dense"] - 1.0)
            for share, runs, entries in [(p.miss_share, [miss_runs[r] for r in p.miss_recalls], miss)] + [
                    (e["share"], [larger_runs[r, e["share"]] for r in p.miss_recalls], e["miss"]) for e in larger]:
                plan = miss_mix.plan_mixes(runs, [m["rise_upper_pct"] for m in entries], threshold_rise,
                                  probe["sensitivity"], p.mix_bound_pct, p.mix_targets)
                for mix in plan["mixes"]:
                    mix["recalls"] = [p.miss_recalls[i] for i in mix["indices"]]
                plans.append((share, plan))
    del prev
    shutil.rmtree(out / "record", ignore_errors=True)
    miss_mix.validate_mixes(source, val, plans, lambda l: StoredPredictors(parts / f"layer_{l:04d}.safetensors")[f"layer.{l}"],
                   p, quiet, out, dense_windows, split)  # a second pass: each mix over the whole held-out text
    strategy = "topk" if ppl["predicted_topk"] <= ppl["predicted_threshold"] else "threshold"
    ppl["predicted"] = ppl[f"predicted_{strategy}"]

    keys = ("recall_topk", "sparsity_topk", "recall_threshold", "sparsity_threshold", "true_sparsity")
    mean = {k: float(np.mean([m[k] for m in layers])) for k in keys}
    mean["rank"] = float(np.mean([m["rank"] for m in layers]))
    ahead = [m["lookahead"] for m in layers if "lookahead" in m]
    pred_values = sum(v for k, v in param_counts.items() if k.startswith("layer."))
    ffn_values = c.ffn_param_count() * c.num_layers
    report = {
        "version": PREDICTORS_VERSION,
        "source_hash": source_hash,
        "profile_hash": profile.get("source_hash", ""),
        "thresholds": p.thresholds,
        "threshold_values": thresholds,
        "params": dataclasses.asdict(p),
        "train_tokens": train.numel(),
        "val_tokens": val.numel(),
        "layers": layers,
        "mean": mean,
        "lookahead_mean": ({k: float(np.mean([m[k] for m in ahead])) for k in ahead[0] if k not in ("topk", "cut")}
                           if ahead else None),
        "size_share": pred_values / ffn_values,
        "size_share_with_lookahead": sum(param_counts.values()) / ffn_values,
        "ppl": ppl,
        # cost-aware selection's candidates, threshold strategy with nothing cached (the gate picks one)
        "rank_choice": rank_choice,
        "miss": miss,
        "miss_share": p.miss_share,
        "miss_larger": larger,
        "cached_share": p.cached_share,
        "miss_probe": probe,  # per-layer miss cuts (layout/miss_mix.py): the probes and the validated mixes
        "miss_mixes": [{"share": share, **plan} for share, plan in plans],
        # the cache split a run makes (layout/schema_cache.py) and, per validated share, each layer's cache
        "cache_demand": None if demand is None else demand.to_json(),
        "cache_split": {f"{s:g}": list(np.broadcast_to(split(s), (c.num_layers,))) for s in (p.miss_share, *p.larger_miss_shares)},
        "threshold_reads": dict(zip(("computed_per_token", "read_per_token"), every_read.per_token())),
        "strategy": strategy,
        "predicted_over_true": (1 - mean[f"sparsity_{strategy}"]) / max(1 - mean["true_sparsity"], 1e-12),
        "train_seconds": train_s,
        "seconds": time.perf_counter() - t0,
        "recall_curves": curves,
    }
    _join_parts(parts, out / WEIGHTS_FILE, {"version": PREDICTORS_VERSION, "source_hash": source_hash,
                                            "strategy": strategy, "thresholds": p.thresholds})
    with open(out / REPORT_FILE, "w") as f:
        json.dump(report, f, indent=1)
    plot_report(out / "recall_vs_sparsity.png", report)
    return report
