"""``sparseflash profile``: activation statistics of a checkpoint on a calibration corpus.

Passes over the model (dense forward, activations seen through the FFN hook):
1. a sample of calibration windows -> per layer, CETT-bounded thresholds (binary search over
   magnitude quantiles) for the analysis bound and for any bound the PPL-p% search asks for;
2. PPL-p% search: bisection on a common CETT bound until held-out perplexity rises by p%;
3. all calibration tokens -> bit-packed active masks (zstd, on disk) at both threshold sets,
   per-neuron frequencies, sparsity and CETT measured at the chosen thresholds;
4. one layer at a time from the masks: reuse ratios, co-activation counts, hot-neuron CDF.
Activations are never all held at once: pass 1 keeps a bounded sample, pass 3 streams to disk.
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
from tqdm import tqdm

from sparseflash.errors import SparseflashError
from sparseflash.layout import stats
from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.artefacts import write_dir_atomically
from sparseflash.layout.coactivation import accumulate_coactivation
from sparseflash.layout.masks import MaskWriter, pack, read_masks
from sparseflash.layout.params import ProfileParams
from sparseflash.layout.pplp import ppl_p_search
from sparseflash.model.loader import DenseModel
from sparseflash.model.perplexity import windows

PROFILE_VERSION = 1
MASK_SETS = ("cett", "ppl")  # thresholds at the analysis CETT bound; thresholds of the PPL-p% search
FULL_COACT_MAX_NEURONS = 4096  # above this only top-k neighbour lists are stored
NEIGHBORS = 64
BOUND_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


class _Recorder:
    """FFN hook state for the current pass."""

    def __init__(self):
        self.fn = None

    def __call__(self, layer, x, a):
        return self.fn(layer, x, a) if self.fn is not None else None


def _progress(total, desc, quiet):
    return tqdm(total=total, desc=desc, unit="tok", disable=quiet, leave=False, dynamic_ncols=True)


def run_profile(model: DenseModel, calib_ids: list[int], heldout_ids: list[int], out_dir: str | os.PathLike,
                params: ProfileParams = ProfileParams(), source_hash: str = "", quiet: bool = False) -> dict:
    """Profile ``model`` and write ``out_dir`` (profile.json, *.npz, masks/, plots). Returns the summary."""
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
        summary = _profile(model, calib, heldout_ids, tmp_dir, p, source_hash, quiet)
        write_plots(tmp_dir, summary)
        return summary

    return write_dir_atomically(out_dir, fill)


def _profile(model, calib, heldout_ids, out, p, source_hash, quiet):
    c = model.config
    t_start = time.perf_counter()
    recorder = _Recorder()
    tap = NeuronTap(model.weights)
    net = tap.transformer(c, recorder)
    w_down = [layer.w_down for layer in model.weights.layers]
    n = c.intermediate_size

    # pass 1: sample windows spread over the calibration set
    n_sample = min(len(calib), max(1, math.ceil(p.cett_tokens / p.ctx)))
    pick = np.unique(np.linspace(0, len(calib) - 1, n_sample).round().astype(int))
    sample = [[] for _ in range(c.num_layers)]
    recorder.fn = lambda layer, x, a: sample[layer].append(a.clone())
    bar = _progress(len(pick) * p.ctx, "threshold sample", quiet)
    for i in range(0, len(pick), p.batch):
        net(calib[pick[i : i + p.batch]])
        bar.update(len(pick[i : i + p.batch]) * p.ctx)
    bar.close()
    searches = []
    for layer in tqdm(range(c.num_layers), desc="threshold search", disable=quiet, leave=False):
        searches.append(stats.CettSearch(torch.cat(sample[layer]), w_down[layer], p.candidates))
        sample[layer] = None
    cett_thr = [s.threshold_for(p.cett_bound)[0] for s in searches]
    curve = {str(b): [s.sparsity_at(s.threshold_for(b)[0]) for s in searches] for b in BOUND_GRID}

    # pass 2: PPL-p% search on held-out text
    found = ppl_p_search(net, lambda hook: setattr(recorder, "fn", hook), searches, tap.masking_hook, heldout_ids,
                         p.ppl_p, p.ctx, p.ppl_tokens, p.ppl_steps, quiet)
    ppl_bound, ppl_thr, dense_ppl, ppl_lo = found.bound, found.thresholds, found.ppl_dense, found.ppl_at_bound
    ppl_tokens, trials = found.tokens, found.trials
    thresholds = {"cett": cett_thr, "ppl": ppl_thr}

    # pass 3: all calibration tokens -> masks, frequencies, sparsity, CETT at both threshold sets
    writers = {(s, l): MaskWriter(out / "masks" / f"{s}_L{l}.bits.zst", n) for s in MASK_SETS
               for l in range(c.num_layers)}
    freq = {s: np.zeros((c.num_layers, n), dtype=np.int64) for s in MASK_SETS}
    cett_sum = {s: np.zeros(c.num_layers) for s in MASK_SETS}
    zeros = np.zeros(c.num_layers)

    def observe(layer, x, a):
        mag = tap.magnitude(layer, a)
        y_norm = torch.linalg.vector_norm(a @ w_down[layer].T, dim=-1)
        zeros[layer] += float((a == 0).sum())
        for s in MASK_SETS:
            t = thresholds[s][layer]
            mask = stats.active_mask(mag, t)
            cett_sum[s][layer] += float(stats.token_cett(a, mag, w_down[layer], t, y_norm).sum())
            freq[s][layer] += mask.sum(0).numpy()
            writers[(s, layer)].write(pack(mask.numpy()))

    recorder.fn = observe
    bar = _progress(calib.numel(), "calibration", quiet)
    try:
        for i in range(0, len(calib), p.batch):
            net(calib[i : i + p.batch])
            bar.update(calib[i : i + p.batch].numel())
    finally:
        bar.close()
        recorder.fn = None
        for w in writers.values():
            w.close()
    tokens = calib.numel()

    # pass 4: per layer from the masks
    layers = []
    coact_gap = {s: [] for s in MASK_SETS}
    for layer in tqdm(range(c.num_layers), desc="co-activation", disable=quiet, leave=False):
        entry = {"layer": layer}
        arrays = {}
        for s in MASK_SETS:
            counts = np.zeros((n, n), dtype=np.int32 if tokens < 2**31 else np.int64)
            rsum = {k: 0.0 for k in stats.REUSE_WINDOWS}
            rcnt = {k: 0 for k in stats.REUSE_WINDOWS}
            for chunk in read_masks(out / "masks" / f"{s}_L{layer}.bits.zst", n, tokens, rows_per_chunk=p.ctx * 32):
                accumulate_coactivation(chunk, n, counts)
                for w in range(0, len(chunk), p.ctx):  # reuse is measured inside each window
                    sums, cnts = stats.reuse_ratios(chunk[w : w + p.ctx])
                    for k in stats.REUSE_WINDOWS:
                        rsum[k] += sums[k]
                        rcnt[k] += cnts[k]
            f = freq[s][layer]
            cdf = stats.hot_cdf(f)
            gap = stats.coactivation_gap(counts)
            coact_gap[s].append(gap)
            nb_idx, nb_cnt = stats.top_neighbors(counts, NEIGHBORS)
            arrays[f"{s}_frequency"] = f
            arrays[f"{s}_neighbors"] = nb_idx
            arrays[f"{s}_neighbor_counts"] = nb_cnt
            arrays[f"{s}_hot_cdf"] = cdf
            if n <= FULL_COACT_MAX_NEURONS:
                arrays[f"{s}_coactivation"] = counts.astype(np.int32 if tokens < 2**31 else np.int64)
            block = {
                "threshold": thresholds[s][layer],
                "sparsity": 1.0 - float(f.sum()) / (tokens * n),
                "mean_cett": cett_sum[s][layer] / tokens,
                "reuse": {str(k): (rsum[k] / rcnt[k] if rcnt[k] else None) for k in stats.REUSE_WINDOWS},
                "coact_gap": gap,
                "hot10_share": float(cdf[10]),
            }
            if s == "cett":
                entry.update(block)
                entry["activation_ratio"] = 1.0 - block["sparsity"]
                entry["exact_zero_share"] = float(zeros[layer]) / (tokens * n)
            else:
                entry["ppl"] = block
        arrays["col_norm"] = tap.down_norms[layer].numpy()
        np.savez_compressed(out / f"layer_{layer:03d}.npz", **arrays)
        layers.append(entry)

    np.savez(out / "thresholds.npz", cett=np.array(cett_thr), ppl=np.array(ppl_thr))
    overall = lambda key: float(np.mean([e[key] for e in layers]))  # noqa: E731
    summary = {
        "version": PROFILE_VERSION,
        "source_hash": source_hash,
        "model": {"arch": c.arch, "layers": c.num_layers, "hidden_size": c.hidden_size, "neurons": n},
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
        "ppl_tokens": ppl_tokens,
        "ppl_p_sparsity": float(np.mean([e["ppl"]["sparsity"] for e in layers])),
        "ppl_search": trials,
        "sparsity_vs_cett": curve,
        "thresholds_in_use": "ppl",
        "layers": layers,
        "seconds": time.perf_counter() - t_start,
    }
    with open(out / "profile.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


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
