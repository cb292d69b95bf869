"""``sparseflash profile``: activation statistics of a checkpoint on a calibration corpus.

Layer-by-layer passes over the checkpoint (calibration.LayerPass: the windows' hidden states go
through layer l, the stage takes what it needs, the layer's weights are dropped):
1. threshold sample + held-out text: per layer, the CETT search on the sample's activations (its
   result kept for any bound later asked for) and the dense held-out perplexity at the end;
2. PPL-p% search: bisection on a common CETT bound until held-out perplexity rises by p%, one
   layer-wise pass over the held-out windows per candidate bound;
3. all calibration tokens: per layer, bit-packed active masks (zstd, on disk) at both threshold
   sets, per-neuron frequencies, then from those masks reuse ratios, co-activation counts and the
   hot-neuron CDF, before the next layer is read.
Mean CETT per layer is measured on the threshold sample (where the search chose the threshold).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import SparseflashError
from sparseflash.layout import stats
from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.artefacts import write_dir_atomically
from sparseflash.layout.calibration import LayerPass
from sparseflash.layout.coactivation import coactivation_stats
from sparseflash.layout.masks import MaskWriter, pack
from sparseflash.layout.params import ProfileParams
from sparseflash.layout.pplp import ppl_p_search
from sparseflash.model.perplexity import windows
from sparseflash.model.source import CheckpointSource

PROFILE_VERSION = 1
MASK_SETS = ("cett", "ppl")  # thresholds at the analysis CETT bound; thresholds of the PPL-p% search
FULL_COACT_MAX_NEURONS = 4096  # above this only top-k neighbour lists are stored
NEIGHBORS = 64
BOUND_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


def run_profile(source: CheckpointSource, calib_ids: list[int], heldout_ids: list[int], out_dir: str | os.PathLike,
                params: ProfileParams = ProfileParams(), source_hash: str = "", quiet: bool = False) -> dict:
    """Profile ``source`` and write ``out_dir`` (profile.json, *.npz, masks/, plots). Returns the summary."""
    p = params
    if not 0 <= p.cett_bound <= 1:
        raise SparseflashError(f"--cett must be in [0, 1], got {p.cett_bound}")
    if p.ppl_p <= 0:
        raise SparseflashError(f"--ppl-p must be > 0, got {p.ppl_p}")
    calib = windows(calib_ids, p.ctx, p.tokens)  # (windows, ctx)
    if len(heldout_ids) < 2 * p.ctx:
        raise SparseflashError(f"the PPL-p% search needs at least {2 * p.ctx} held-out tokens, got "
                               f"{len(heldout_ids)}; pass --ppl-text or lower --tokens")

    def fill(tmp_dir: Path) -> dict:
        from sparseflash.layout.profile_plots import write_plots

        (tmp_dir / "masks").mkdir()
        summary = _profile(source, calib, heldout_ids, tmp_dir, p, source_hash, quiet)
        write_plots(tmp_dir, summary)
        return summary

    return write_dir_atomically(out_dir, fill)


def _pass(source, streams, p, desc, quiet, out):
    return LayerPass(source, streams, p.batch, desc, quiet, p.spill_bytes, out)


def _threshold_pass(source, calib, held, p, quiet, out):
    """Pass 1: per layer the CETT search of the sample's activations; the dense held-out NLL."""
    n_sample = min(len(calib), max(1, math.ceil(p.cett_tokens / p.ctx)))
    pick = np.unique(np.linspace(0, len(calib) - 1, n_sample).round().astype(int))
    searches = []
    sample = calib[pick]
    with _pass(source, {"sample": sample, "held": held}, p, "threshold sample", quiet, out) as lp:
        for layer, w in lp.layers():
            acts = torch.empty(sample.numel(), source.config.intermediate_size)  # (sample tokens, neurons)

            def keep(l, rows, x, a, acts=acts):
                acts[rows] = a

            lp.run("sample", layer, w, keep)
            lp.bar.set_postfix_str(f"layer {layer + 1}/{source.config.num_layers}: CETT curve")
            searches.append(stats.CettCurve(acts, w.stored("w_down"), p.candidates))  # bf16 rows read as stored
            del acts
            lp.run("held", layer, w)
        dense_nll = lp.nll("held")
    return searches, dense_nll



def _masked_ppl(source, held, p, quiet, out):
    """``ppl_at`` of the PPL-p% search: one layer-wise pass over the held-out windows per candidate,
    every FFN masked at the candidate's thresholds."""

    def ppl_at(thresholds, label):
        assert thresholds is not None, "the dense perplexity comes from the threshold pass"
        tap = NeuronTap.layerwise(source.config.num_layers, thresholds)
        with _pass(source, {"held": held}, p, label, quiet, out) as lp:
            for layer, w in lp.layers():
                tap.add_layer(layer, w)
                lp.run("held", layer, w, tap.masking_layer_hook())
            total, count = lp.nll("held")
        return math.exp(total / count)

    return ppl_at


def _profile(source, calib, heldout_ids, out, p, source_hash, quiet):
    c = source.config
    t_start = time.perf_counter()
    ppl_tokens = min(len(heldout_ids) // p.ctx * p.ctx, p.ppl_tokens)
    held = windows(heldout_ids, p.ctx, ppl_tokens)
    timing = {}
    t = time.perf_counter()
    searches, dense_nll = _threshold_pass(source, calib, held, p, quiet, out)
    timing["threshold_sample_s"], t = time.perf_counter() - t, time.perf_counter()
    cett_thr = [s.threshold_for(p.cett_bound)[0] for s in searches]
    curve = {str(b): [s.sparsity_at(s.threshold_for(b)[0]) for s in searches] for b in BOUND_GRID}
    found = ppl_p_search(searches, _masked_ppl(source, held, p, quiet, out), p.ppl_p, p.ppl_steps, held.numel(),
                         math.exp(dense_nll[0] / dense_nll[1]), quiet)
    ppl_bound, ppl_thr, dense_ppl, ppl_lo, trials = (found.bound, found.thresholds, found.ppl_dense,
                                                     found.ppl_at_bound, found.trials)
    timing["ppl_search_s"], t = time.perf_counter() - t, time.perf_counter()
    thresholds = {"cett": cett_thr, "ppl": ppl_thr}
    sample_cett = {"cett": [s.threshold_for(p.cett_bound)[1] for s in searches],
                   "ppl": [s.threshold_for(ppl_bound)[1] for s in searches]}  # mean CETT on the sample
    del searches
    layers = _calibration_pass(source, calib, thresholds, sample_cett, out, p, quiet)
    timing["calibration_s"] = time.perf_counter() - t
    tokens = calib.numel()

    np.savez(out / "thresholds.npz", cett=np.array(cett_thr), ppl=np.array(ppl_thr))
    overall = lambda key: float(np.mean([e[key] for e in layers]))  # noqa: E731
    summary = {
        "version": PROFILE_VERSION,
        "source_hash": source_hash,
        "model": {"arch": c.arch, "layers": c.num_layers, "hidden_size": c.hidden_size, "neurons": c.intermediate_size},
        "params": dataclasses.asdict(p),
        "tokens": tokens,
        "windows": len(calib),
        "cett_bound": p.cett_bound,
        "sparsity": overall("sparsity"),
        "mean_cett": overall("mean_cett"),
        "exact_zero_share": overall("exact_zero_share"),
        "reuse": {str(k): float(np.mean([e["reuse"][str(k)] or 0 for e in layers])) for k in stats.REUSE_WINDOWS},
        "coact_gap": overall("coact_gap"),
        "hot10_share": overall("hot10_share"),
        "ppl_p": p.ppl_p,
        "ppl_bound": ppl_bound,
        "ppl_dense": dense_ppl,
        "ppl_at_bound": ppl_lo,
        "ppl_tokens": held.numel(),
        "ppl_p_sparsity": float(np.mean([e["ppl"]["sparsity"] for e in layers])),
        "ppl_search": trials,
        "sparsity_vs_cett": curve,
        "thresholds_in_use": "ppl",
        "layers": layers,
        "seconds": time.perf_counter() - t_start,
        "timing": timing,
    }
    with open(out / "profile.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _calibration_pass(source, calib, thresholds, sample_cett, out, p, quiet):
    """Pass 3: masks, frequencies and exact-zero counts of every calibration token at both
    threshold sets; each layer's statistics from its masks once the layer is done."""
    c = source.config
    n = c.intermediate_size
    tap = NeuronTap.layerwise(c.num_layers)
    layers = []
    with _pass(source, {"calib": calib}, p, "calibration", quiet, out) as lp:
        for layer, w in lp.layers():
            tap.add_layer(layer, w)
            writers = {s: MaskWriter(out / "masks" / f"{s}_L{layer}.bits.zst", n) for s in MASK_SETS}
            packed = {s: [] for s in MASK_SETS}
            freq = {s: np.zeros(n, dtype=np.int64) for s in MASK_SETS}
            zeros = [0]

            def observe(l, rows, x, a, writers=writers, packed=packed, freq=freq, zeros=zeros):
                mag = tap.magnitude(l, a)
                zeros[0] += int((a == 0).sum())
                for s in MASK_SETS:
                    mask = stats.active_mask(mag, thresholds[s][l])
                    freq[s] += mask.sum(0).numpy()
                    packed[s].append(pack(mask.numpy()))
                    writers[s].write(packed[s][-1])

            try:
                lp.run("calib", layer, w, observe)
            finally:
                for wr in writers.values():
                    wr.close()
            lp.bar.set_postfix_str(f"layer {layer + 1}/{c.num_layers}: co-activation")
            masks = {s: np.concatenate(packed[s]) for s in MASK_SETS}
            del packed
            layers.append(_layer_statistics(out, layer, n, masks, freq, zeros[0], thresholds, sample_cett,
                                            tap.down_norms[layer], p))
            tap.down_norms[layer] = None
    return layers


def _layer_statistics(out, layer, n, masks, freq, zeros, thresholds, sample_cett, col_norm, p):
    """Reuse, co-activation and hot-neuron figures of one layer from its packed masks (tokens, n/8)
    per threshold set; writes layer_NNN.npz."""
    entry = {"layer": layer}
    arrays = {}
    for s in MASK_SETS:
        tokens = len(masks[s])
        rsum = {k: 0.0 for k in stats.REUSE_WINDOWS}
        rcnt = {k: 0 for k in stats.REUSE_WINDOWS}
        for w in range(0, tokens, p.ctx):  # reuse is measured inside each window
            sums, cnts = stats.reuse_ratios(masks[s][w : w + p.ctx])
            for k in stats.REUSE_WINDOWS:
                rsum[k] += sums[k]
                rcnt[k] += cnts[k]
        co = coactivation_stats(masks[s], n, NEIGHBORS, keep_full=n <= FULL_COACT_MAX_NEURONS,
                                block_bytes=p.coact_block_bytes)
        f = freq[s]
        cdf = stats.hot_cdf(f)
        arrays[f"{s}_frequency"] = f
        arrays[f"{s}_neighbors"] = co.neighbors
        arrays[f"{s}_neighbor_counts"] = co.neighbor_counts
        arrays[f"{s}_hot_cdf"] = cdf
        if co.counts is not None:
            arrays[f"{s}_coactivation"] = co.counts
        block = {
            "threshold": thresholds[s][layer],
            "sparsity": 1.0 - float(f.sum()) / (tokens * n),
            "mean_cett": sample_cett[s][layer],
            "reuse": {str(k): (rsum[k] / rcnt[k] if rcnt[k] else None) for k in stats.REUSE_WINDOWS},
            "coact_gap": co.gap,
            "hot10_share": float(cdf[10]),
        }
        if s == "cett":
            entry.update(block)
            entry["activation_ratio"] = 1.0 - block["sparsity"]
            entry["exact_zero_share"] = float(zeros) / (tokens * n)
        else:
            entry["ppl"] = block
    arrays["col_norm"] = col_norm.numpy()
    np.savez_compressed(out / f"layer_{layer:03d}.npz", **arrays)
    return entry


def load_profile(path: str | os.PathLike) -> dict:
    """profile.json of a profile directory, with a clear error when missing or malformed."""
    from sparseflash.errors import ArtefactError

    file = Path(path) / "profile.json"
    try:
        with open(file) as f:
            prof = json.load(f)
    except FileNotFoundError:
        raise ArtefactError(f"{file}: not found; run `sparseflash profile -o {path}` first") from None
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{file}: not valid JSON ({e})") from None
    if prof.get("version") != PROFILE_VERSION:
        raise ArtefactError(f"{file}: profile version {prof.get('version')!r}, expected {PROFILE_VERSION}; re-run profile")
    return prof


BRIEF_KEYS = ("sparsity", "cett_bound", "mean_cett", "ppl_p", "ppl_p_sparsity", "ppl_bound", "ppl_dense", "ppl_at_bound",
              "tokens", "exact_zero_share", "reuse", "coact_gap", "hot10_share", "seconds")
BRIEF_LAYER_KEYS = ("threshold", "sparsity", "mean_cett", "reuse", "coact_gap", "hot10_share", "activation_ratio")


def profile_brief(summary: dict) -> dict:
    """The headline figures of a profile summary (what `profile --json` prints)."""
    out = {k: summary[k] for k in BRIEF_KEYS}
    out["layers"] = [{k: e[k] for k in BRIEF_LAYER_KEYS} for e in summary["layers"]]
    return out


def profile_text(summary: dict, source: str, out_dir: str) -> str:
    """A profile summary as a few lines."""
    s = summary
    return "\n".join([
        f"profile of {source} on {s['tokens']} tokens -> {out_dir}",
        f"  sparsity at CETT {s['cett_bound']}: {s['sparsity']:.1%} (mean CETT {s['mean_cett']:.3f}; "
        f"exact zeros {s['exact_zero_share']:.1%})",
        f"  PPL+{s['ppl_p']}% sparsity: {s['ppl_p_sparsity']:.1%} at CETT bound {s['ppl_bound']:.4f} "
        f"(ppl {s['ppl_dense']:.3f} -> {s['ppl_at_bound']:.3f})",
        "  reuse ratio: " + ", ".join(f"k={k}: {v:.3f}" for k, v in s["reuse"].items()),
        f"  co-activation gap {s['coact_gap']:.3f}; 10% hottest neurons cover {s['hot10_share']:.1%} of activations",
        f"  {s['seconds']:.1f} s"])
