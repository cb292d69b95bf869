"""``sparseflash layout-report``: what reading a layout costs per token, on held-out text.

True active sets come from a dense forward over the held-out tokens with the layout's own weights
and thresholds. For the file's order the hot region is resident (never read per token); the
``identity`` baseline is checkpoint order with nothing pinned (the naive layout), and
``identity_same_hot`` pins the same hot neurons so the effect of ordering alone is visible.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.format_extents import mask_read_cost
from sparseflash.model.perplexity import windows
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import open_layout


def true_active_masks(lm, ids: list[int], tokens: int, ctx: int, quiet: bool = True) -> list[np.ndarray]:
    """Per layer (tokens, neurons) bool active sets, neurons in stored order, at the layout's thresholds."""
    c = lm.config
    seqs = windows(ids, ctx, tokens)
    tap = NeuronTap(lm.weights, [layer.threshold for layer in lm.file.layers])
    out = [[] for _ in range(c.num_layers)]

    def hook(l, x, a):
        out[l].append(tap.active(l, a).numpy())

    net = tap.transformer(c, hook)
    for i in tqdm(range(0, len(seqs), 8), desc="held-out active sets", disable=quiet, leave=False):
        net(seqs[i : i + 8])
    return [np.concatenate(m) for m in out]


def _cost(masks, bundle_bytes, device: DeviceModel) -> dict:
    req, nbytes = [], []
    mreq, mbytes = [], []
    gap = device.merge_gap_blocks
    for m in masks:
        r, b = mask_read_cost(m, bundle_bytes)
        req.append(r)
        nbytes.append(b)
        r2, b2 = mask_read_cost(m, bundle_bytes, gap) if gap > 0 else (r, b)
        mreq.append(r2)
        mbytes.append(b2)
    req, nbytes = np.sum(req, axis=0), np.sum(nbytes, axis=0)  # per token over all layers
    mreq, mbytes = np.sum(mreq, axis=0), np.sum(mbytes, axis=0)
    modelled = np.minimum(device.read_time(req, nbytes), device.read_time(mreq, mbytes))
    return {
        "requests_per_token": float(req.mean()),
        "bytes_per_token": float(nbytes.mean()),
        "bytes_per_request": float(nbytes.sum() / max(req.sum(), 1)),
        "merged_requests_per_token": float(mreq.mean()),
        "merged_bytes_per_token": float(mbytes.mean()),
        "modelled_read_ms_per_token": float(modelled.mean() * 1e3),
        "per_layer_requests": [float(r.mean()) for r in (mask_read_cost(m, bundle_bytes)[0] for m in masks)],
    }


def layout_report(path: str, ids: list[int], tokens: int = 8192, ctx: int = 256,
                  device: DeviceModel | None = None, quiet: bool = False) -> dict:
    """Requests, bytes and modelled read time per token for the file's order and checkpoint order."""
    lm = open_layout(path, with_ffn=True)
    try:
        if device is None:
            from sparseflash.runtime.diskprobe import device_model_for

            device = device_model_for(path)
        masks = true_active_masks(lm, ids, tokens, ctx, quiet)
        layers = lm.file.layers
        bundle_bytes = layers[0].bundle_bytes
        own, ident, ident_hot = [], [], []
        for l, m in enumerate(masks):
            perm = np.asarray(lm.file.permutation(l))
            n_hot = layers[l].n_hot
            stored = m.copy()
            stored[:, :n_hot] = False
            own.append(stored)
            checkpoint = np.zeros_like(m)
            checkpoint[:, perm] = m  # column perm[j] (original id) <- stored position j
            ident.append(checkpoint)
            pinned = checkpoint.copy()
            pinned[:, perm[:n_hot]] = False
            ident_hot.append(pinned)
        n_tokens = len(masks[0])
        active = float(np.mean([m.sum(1).mean() for m in masks]))
        report = {
            "layout": str(path),
            "order": lm.header.provenance.get("order"),
            "tokens": n_tokens,
            "hot_fraction": lm.header.provenance.get("hot_fraction"),
            "bundle_bytes": bundle_bytes,
            "active_per_layer_per_token": active,
            "device_model": device.to_dict(),
            **_cost(own, bundle_bytes, device),
            "identity": _cost(ident, bundle_bytes, device),
            "identity_same_hot": _cost(ident_hot, bundle_bytes, device),
        }
        base = report["identity"]
        report["requests_ratio_vs_identity"] = report["requests_per_token"] / max(base["requests_per_token"], 1e-12)
        report["bytes_ratio_vs_identity"] = report["bytes_per_token"] / max(base["bytes_per_token"], 1e-12)
        report["modelled_time_ratio_vs_identity"] = (report["modelled_read_ms_per_token"]
                                                     / max(base["modelled_read_ms_per_token"], 1e-12))
        return report
    finally:
        lm.close()
