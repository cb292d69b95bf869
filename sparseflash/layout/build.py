"""``sparseflash layout``: write a checkpoint, its profile and predictors as one .sflash file.

Per FFN layer the neurons are reordered (see ordering.py) and stored as bundles; everything the
runtime needs besides (config, tokenizer, attention/embedding/norm weights, predictors with their
outputs permuted to stored order, thresholds, permutations) goes in the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.kernels.bundles import pack_bundles
from sparseflash.layout.format import LayoutWriter
from sparseflash.layout.masks import load_masks, unpack
from sparseflash.layout.ordering import ORDERS, LayerStats, order_layer
from sparseflash.layout.profile import load_profile
from sparseflash.model.loader import DenseModel

LAYOUT_KIND = "sparseflash-layout"
ORDER_SAMPLE_TOKENS = 8192  # calibration tokens used to measure candidate orders
ATTENTION_FIELDS = ("attn_norm_w", "attn_norm_b", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
                    "ffn_norm_w", "ffn_norm_b", "b_down")
NP_DTYPE = {"f32": np.float32, "f16": np.float16}


def _resident(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, str]:
    """Matrices in the storage dtype, vectors in f32 (small, and norms want the precision)."""
    if t.dim() == 1 or dtype == "f32":
        return t.float().numpy(), "f32"
    if dtype == "bf16":
        return t.to(torch.bfloat16).view(torch.uint16).numpy(), "bf16"
    return t.to(torch.float16).numpy(), "f16"


def _layer_stats(profile_dir: Path, layer: int, n: int, tokens: int, thresholds: str) -> LayerStats:
    npz = np.load(profile_dir / f"layer_{layer:03d}.npz")
    coact = npz[f"{thresholds}_coactivation"] if f"{thresholds}_coactivation" in npz.files else None
    masks_path = profile_dir / "masks" / f"{thresholds}_L{layer}.bits.zst"
    masks = None
    if masks_path.exists():
        packed = load_masks(masks_path, n, tokens)
        if len(packed) > ORDER_SAMPLE_TOKENS:  # evenly spaced whole windows keep the measure cheap
            packed = packed[:ORDER_SAMPLE_TOKENS]
        masks = unpack(packed, n)
    return LayerStats(npz[f"{thresholds}_frequency"], npz[f"{thresholds}_neighbors"],
                      npz[f"{thresholds}_neighbor_counts"], coact, masks)


def build_layout(model: DenseModel, profile_dir: str | os.PathLike, out_path: str | os.PathLike,
                 predictors_dir: str | os.PathLike | None = None, order: str = "coact", dtype: str = "f16",
                 hot_fraction: float = 0.05, thresholds: str = "ppl", zstd_level: int | None = None,
                 source_hash: str = "", quiet: bool = False) -> dict:
    """Write the layout file; returns its header (what was written and why)."""
    c = model.config
    if order not in ORDERS:
        raise SparseflashError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if dtype not in ("f32", "f16", "bf16"):
        raise SparseflashError(f"--dtype must be f32, f16 or bf16, got {dtype!r}")
    if not 0 <= hot_fraction < 1:
        raise SparseflashError(f"--hot-fraction must be in [0, 1), got {hot_fraction}")
    profile_dir = Path(profile_dir)
    profile = load_profile(profile_dir)
    if source_hash and profile.get("source_hash") not in ("", source_hash):
        raise ArtefactError(f"{profile_dir}: profile is of checkpoint {profile['source_hash']}, this one is "
                            f"{source_hash}; re-run `sparseflash profile`")
    if profile["model"]["layers"] != c.num_layers or profile["model"]["neurons"] != c.intermediate_size:
        raise ArtefactError(f"{profile_dir}: profile shape does not match the checkpoint")
    thr = np.load(profile_dir / "thresholds.npz")[thresholds]
    preds, pred_meta, pred_report = {}, None, None
    if predictors_dir is not None:
        from sparseflash.layout.predictors_build import REPORT_FILE, load_predictors

        preds, pred_meta = load_predictors(predictors_dir)
        if source_hash and pred_meta.get("source_hash") not in ("", source_hash):
            raise ArtefactError(f"{predictors_dir}: predictors are of another checkpoint; re-run predictors")
        if pred_meta.get("thresholds") != thresholds:
            raise ArtefactError(f"{predictors_dir}: predictors were trained on {pred_meta.get('thresholds')} "
                                f"thresholds, the layout uses {thresholds}")
        pred_report = json.loads((Path(predictors_dir) / REPORT_FILE).read_text())

    n, d = c.intermediate_size, c.hidden_size
    bundle_bytes = (3 if c.gated else 2) * d * (4 if dtype == "f32" else 2)
    n_hot = int(round(hot_fraction * n))
    perms, order_report = [], []
    for l in tqdm(range(c.num_layers), desc=f"ordering ({order})", disable=quiet, leave=False):
        stats = _layer_stats(profile_dir, l, n, profile["tokens"], thresholds)
        perm, rep = order_layer(order, stats, n_hot, bundle_bytes)
        perms.append(perm.astype(np.int32))
        order_report.append({"layer": l, **rep})

    header_extra = {
        "profile": {"source_hash": profile.get("source_hash", ""), "thresholds": thresholds,
                    "tokens": profile["tokens"], "cett_bound": profile["cett_bound"], "ppl_p": profile["ppl_p"],
                    "ppl_bound": profile["ppl_bound"]},
        "order": order,
        "order_report": order_report,
        "hot_fraction": hot_fraction,
    }
    pred_info = None
    if preds:
        pred_info = {"strategy": pred_meta.get("strategy", "threshold"),
                     "report": {k: pred_report.get(k) for k in ("mean", "lookahead_mean", "ppl", "size_share")}}
    return write_layout(model, out_path, perms, n_hot, [float(t) for t in thr], dtype, preds, pred_info,
                        header_extra, zstd_level, source_hash, quiet)


def write_layout(model: DenseModel, out_path: str | os.PathLike, perms: list[np.ndarray], n_hot: int,
                 thresholds: list[float], dtype: str = "f16", preds: dict | None = None, pred_info: dict | None = None,
                 header_extra: dict | None = None, zstd_level: int | None = None, source_hash: str = "",
                 quiet: bool = False) -> dict:
    """Write a layout file from in-memory weights, per-layer permutations and thresholds.

    ``preds`` maps ``layer.{l}`` / ``lookahead.{l}`` to predictors (rows in checkpoint order; they are
    permuted to stored order here). Returns the header written.
    """
    c = model.config
    w = model.weights
    n, d = c.intermediate_size, c.hidden_size
    preds = preds or {}
    bundle_bytes = (3 if c.gated else 2) * d * (4 if dtype == "f32" else 2)
    header = {
        "kind": LAYOUT_KIND,
        "model": c.to_dict(),
        "tokenizer_json": model.tokenizer.to_json(),
        "source_hash": source_hash,
        "predictors": None,
        "dtype": dtype,
        "n_hot": n_hot,
        "bundle_bytes": bundle_bytes,
        **(header_extra or {}),
    }
    if preds:
        header["predictors"] = {
            "strategy": (pred_info or {}).get("strategy", "threshold"),
            "layers": [{"topk": preds[f"layer.{l}"].topk, "cut": preds[f"layer.{l}"].cut,
                        "rank": preds[f"layer.{l}"].rank} for l in range(c.num_layers)],
            "lookahead": [({"topk": preds[f"lookahead.{l}"].topk, "cut": preds[f"lookahead.{l}"].cut}
                           if f"lookahead.{l}" in preds else None) for l in range(c.num_layers)],
            "report": (pred_info or {}).get("report"),
        }
    writer = LayoutWriter(out_path, header, zstd_level=zstd_level)
    for name, t in (("embed", w.embed), ("final_norm_w", w.final_norm_w), ("final_norm_b", w.final_norm_b)):
        if t is not None:
            arr, dt = _resident(t, dtype)
            writer.add_tensor(name, arr, dt)
    if w.lm_head is not w.embed:
        arr, dt = _resident(w.lm_head, dtype)
        writer.add_tensor("lm_head", arr, dt)
    for l, layer in enumerate(w.layers):
        perm = perms[l]
        for field in ATTENTION_FIELDS:
            t = getattr(layer, field)
            if t is not None:
                arr, dt = _resident(t, dtype)
                writer.add_tensor(f"layers.{l}.{field}", arr, dt)
        for field in ("b_up", "b_gate"):
            t = getattr(layer, field)
            if t is not None:
                writer.add_tensor(f"layers.{l}.{field}", t.float().numpy()[perm], "f32")
        writer.add_tensor(f"layers.{l}.perm", perm, "i32")
        for kind in ("layer", "lookahead"):
            p = preds.get(f"{kind}.{l}")
            if p is None:
                continue
            writer.add_tensor(f"pred.{kind}.{l}.w1", p.w1.float().numpy(), "f32")
            writer.add_tensor(f"pred.{kind}.{l}.b1", p.b1.float().numpy(), "f32")
            writer.add_tensor(f"pred.{kind}.{l}.w2", p.w2.float().numpy()[perm], "f32")  # rows in stored order
            writer.add_tensor(f"pred.{kind}.{l}.b2", p.b2.float().numpy()[perm], "f32")

        def bundles(layer=layer, perm=perm, block=4096):
            for i in range(0, n, block):
                ids = torch.from_numpy(perm[i : i + block].astype(np.int64))
                gate = layer.w_gate[ids].numpy() if c.gated else None
                yield pack_bundles(layer.w_up[ids].numpy(), layer.w_down[:, ids].numpy(), gate, dtype=dtype)

        writer.add_ffn_layer(d_model=d, n_neurons=n, gated=c.gated, dtype=dtype, permutation=f"layers.{l}.perm",
                             bundles=bundles(), n_hot=n_hot, threshold=float(thresholds[l]))
    bar = tqdm(total=None, desc="writing layout", unit="B", unit_scale=True, disable=quiet, leave=False)

    def progress(done, total_raw):
        bar.total = total_raw
        bar.update(done - bar.n)

    try:
        writer.write(progress=progress)
    finally:
        bar.close()
    return header
