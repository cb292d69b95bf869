"""``sparseflash layout``: write a checkpoint, its profile and predictors as one .sflash file.

Per FFN layer the neurons are reordered (see ordering.py) and stored as bundles; everything the
runtime needs besides (config, tokenizer, attention/embedding/norm weights, predictors with their
outputs permuted to stored order, thresholds, permutations) goes in the same file, under the names
and in the form layout/schema.py defines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.kernels import pack_bundles
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutWriter
from sparseflash.layout.layout_weights import LayoutWeights, ResidentStage
from sparseflash.layout.masks import load_masks, unpack
from sparseflash.layout.memory_plan import BUNDLE_BLOCK
from sparseflash.layout.ordering import LayerStats, order_layer
from sparseflash.layout.params import LayoutParams
from sparseflash.layout.profile import load_profile
from sparseflash.layout.schema import ModelHeader, PredictorsHeader, PredictorSpec
from sparseflash.layout.schema_cache import CacheDemand
from sparseflash.model.loader import DenseModel
from sparseflash.model.source import CheckpointSource

ORDER_SAMPLE_TOKENS = 8192  # calibration tokens used to measure candidate orders


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


def build_layout(model: DenseModel | CheckpointSource, profile_dir: str | os.PathLike, out_path: str | os.PathLike,
                 predictors_dir: str | os.PathLike | None = None, params: LayoutParams = LayoutParams(),
                 source_hash: str = "", quiet: bool = False, gate: dict | None = None) -> ModelHeader:
    """Write the layout file; returns its header (what was written and why). ``gate``: prepare's
    quality-gate decision (layout/quality_gate.py), recorded with the predictors."""
    c, p = model.config, params
    profile_dir = Path(profile_dir)
    profile = load_profile(profile_dir)
    if source_hash and profile.get("source_hash") not in ("", source_hash):
        raise ArtefactError(f"{profile_dir}: profile is of checkpoint {profile['source_hash']}, this one is "
                            f"{source_hash}; re-run `sparseflash profile`")
    if profile["model"]["layers"] != c.num_layers or profile["model"]["neurons"] != c.intermediate_size:
        raise ArtefactError(f"{profile_dir}: profile shape does not match the checkpoint; re-run `sparseflash profile`")
    thresholds = [float(t) for t in np.load(profile_dir / "thresholds.npz")[p.thresholds]]
    preds, strategy, report, demand = {}, "threshold", None, None
    if predictors_dir is not None:
        from sparseflash.layout.predictors_build import REPORT_FILE, load_predictors

        preds, meta = load_predictors(predictors_dir)
        if source_hash and meta.get("source_hash") not in ("", source_hash):
            raise ArtefactError(f"{predictors_dir}: predictors are of checkpoint {meta.get('source_hash')}, this "
                                f"one is {source_hash}; re-run `sparseflash predictors`")
        if meta.get("thresholds") != p.thresholds:
            raise ArtefactError(f"{predictors_dir}: predictors were trained on {meta.get('thresholds')} "
                                f"thresholds, the layout uses {p.thresholds}; re-run `sparseflash predictors "
                                f"--thresholds {p.thresholds}`")
        strategy = meta.get("strategy", "threshold")
        full = json.loads((Path(predictors_dir) / REPORT_FILE).read_text())
        report = {k: full.get(k) for k in ("mean", "lookahead_mean", "ppl", "size_share")}
        if full.get("cache_demand") is not None:  # how a run splits its cache (the candidates were validated so)
            try:
                demand = CacheDemand.from_json(full["cache_demand"])
            except (KeyError, TypeError, ValueError) as e:
                raise ArtefactError(f"{predictors_dir}: bad cache_demand in {REPORT_FILE} ({e}); re-run "
                                    "`sparseflash predictors`") from None
            if demand.layers != c.num_layers:
                raise ArtefactError(f"{predictors_dir}: cache demand of {demand.layers} layers, the model has "
                                    f"{c.num_layers}; re-run `sparseflash predictors`")

    n = c.intermediate_size
    n_hot = int(round(p.hot_fraction * n))
    bundle_bytes = _bundle_bytes(c, p.dtype)
    perms, order_report = [], []
    for l in tqdm(range(c.num_layers), desc=f"ordering ({p.order})", unit="layer", disable=quiet, leave=False):
        stats = _layer_stats(profile_dir, l, n, profile["tokens"], p.thresholds)
        perm, rep = order_layer(p.order, stats, n_hot, bundle_bytes)
        perms.append(perm.astype(np.int32))
        order_report.append({"layer": l, **rep})
    provenance = {
        "profile": {"source_hash": profile.get("source_hash", ""), "thresholds": p.thresholds,
                    "tokens": profile["tokens"], "cett_bound": profile["cett_bound"], "ppl_p": profile["ppl_p"],
                    "ppl_bound": profile["ppl_bound"]},
        "order": p.order,
        "order_report": order_report,
        "hot_fraction": p.hot_fraction,
    }
    return write_layout(model, out_path, perms, n_hot, thresholds, p.dtype, preds, strategy, report, provenance,
                        p.zstd_level, source_hash, quiet, p.resident, gate=gate if preds else None,
                        cache_demand=demand)


def _bundle_bytes(c, dtype: str) -> int:
    try:
        return schema.bundle_bytes(c.hidden_size, c.gated, dtype)
    except ValueError as e:
        raise SparseflashError(f"--dtype {dtype}: {e}") from None


def write_layout(model: DenseModel | CheckpointSource, out_path: str | os.PathLike, perms: list[np.ndarray], n_hot: int,
                 thresholds: list[float], dtype: str = "f16", predictors: dict | None = None,
                 strategy: str = "threshold", report: dict | None = None, provenance: dict | None = None,
                 zstd_level: int | None = None, source_hash: str = "", quiet: bool = False,
                 resident_dtype: str | None = None, gate: dict | None = None,
                 cache_demand: CacheDemand | None = None) -> ModelHeader:
    """Write a layout file from a model's weights (in memory, or a checkpoint source read a layer at a
    time: at most one layer and a block of bundles in memory), per-layer permutations and thresholds.

    ``predictors`` maps ``layer.{l}`` / ``lookahead.{l}`` to layout/predictor.Predictor objects (rows in
    checkpoint order; they are permuted to stored order here, and parked in files like the resident
    tensors, so a lazy mapping such as predictors_build.StoredPredictors is read one at a time). ``resident_dtype`` (default: as
    ``dtype``, f16 for quantized bundles) stores the resident matrices. ``cache_demand`` (with predictors):
    how a run splits its cache among layers (layout/schema_cache.py). Returns the header written.
    """
    w = LayoutWeights(model)  # an in-memory model, or a checkpoint source read one layer at a time
    c = w.config
    predictors = predictors or {}
    pred_header = None
    if predictors:
        # cost-aware selection: the miss cut of the recall prepare's gate validated, where one was
        # (and, per larger validated cache share, the recall kept with it)
        recalls = gate.get("miss_recalls", []) if gate is not None else []

        def indices(record) -> list[int | None]:  # per layer, the candidate the gate kept (per-layer or one)
            if record.get("miss_layer_recalls"):
                if len(record["miss_layer_recalls"]) != c.num_layers:
                    raise ArtefactError(f"the quality gate chose miss cuts for {len(record['miss_layer_recalls'])} "
                                        f"layers, the model has {c.num_layers}; re-run `sparseflash prepare`")
                return [recalls.index(r) for r in record["miss_layer_recalls"]]
            r = record.get("miss_recall")
            return [None if r is None else recalls.index(r)] * c.num_layers

        miss_at = indices(gate) if gate is not None else [None] * c.num_layers
        larger_at = [(e["share"], indices(e)) for e in (gate or {}).get("miss_larger", [])
                     if e["miss_recall"] is not None or e.get("miss_layer_recalls")]

        def spec(p, l):
            if p is None:
                return None
            at = miss_at[l]
            miss = float(p.miss_cuts[at]) if at is not None and len(p.miss_cuts) > at else None
            larger = tuple((float(s), float(p.miss_cuts[i[l]])) for s, i in larger_at if len(p.miss_cuts) > i[l])
            cached = None if (miss is None and not larger) or p.cached_cut is None else float(p.cached_cut)
            return PredictorSpec(int(p.topk), float(p.cut), int(p.rank), miss, cached, larger)
        pred_header = PredictorsHeader(strategy, tuple(spec(predictors[f"layer.{l}"], l) for l in range(c.num_layers)),
                                       tuple(spec(predictors.get(f"lookahead.{l}"), l) for l in range(c.num_layers)),
                                       report, gate, cache_demand)
    resident_dtype = resident_dtype or ("f16" if dtype in ("q8", "q4") else dtype)
    header = ModelHeader(c.to_dict(), w.tokenizer_json, source_hash, dtype, n_hot, pred_header,
                         provenance or {}, resident_dtype)
    _bundle_bytes(c, dtype)
    writer = LayoutWriter(out_path, header.to_json(), zstd_level=zstd_level)
    stage = ResidentStage(out_path)  # resident tensors wait in files until the writer reads them

    def check_columns(name: str, columns: int, tag: str) -> None:
        if tag in ("q8", "q4") and columns % 32:
            raise SparseflashError(f"--resident-dtype {tag}: {name} has {columns} columns, not a multiple of 32")

    def resident(name: str, t: torch.Tensor) -> None:  # matrices in the resident dtype, vectors in f32
        tag = "f32" if t.dim() == 1 else resident_dtype
        check_columns(name, t.shape[-1], tag)
        writer.add_tensor(name, stage.put(t, tag), tag, shape=tuple(t.shape))

    def row_blocks(name: str, source_name: str) -> None:  # embedding / head, converted a block of rows at a time
        shape = (c.vocab_size, c.hidden_size)
        check_columns(name, shape[1], resident_dtype)
        writer.add_tensor(name, stage.put_blocks(w.row_blocks(source_name), shape, resident_dtype), resident_dtype,
                          shape=shape)

    row_blocks(schema.EMBED, "embed")
    resident(schema.FINAL_NORM_W, w.vector("final_norm_w"))
    if w.vector("final_norm_b") is not None:
        resident(schema.FINAL_NORM_B, w.vector("final_norm_b"))
    if not w.tied:
        row_blocks(schema.LM_HEAD, "lm_head")
    for l in range(c.num_layers):
        layer = w.layer(l)  # read now, dropped after its resident tensors are parked
        perm = perms[l]
        for name in schema.LAYER_FIELDS:
            t = getattr(layer, name)
            if t is not None:
                resident(schema.layer_tensor(l, name), t)
        for name in schema.NEURON_BIAS_FIELDS:
            t = getattr(layer, name)
            if t is not None:
                writer.add_tensor(schema.layer_tensor(l, name), t.float().numpy()[perm], "f32")
        writer.add_tensor(schema.permutation_tensor(l), perm, "i32")
        for kind in schema.PREDICTOR_KINDS:
            p = predictors.get(f"{kind}.{l}")
            if p is None:
                continue
            idx = torch.from_numpy(perm.astype(np.int64))
            rows = {"w1": p.w1, "b1": p.b1, "w2": p.w2[idx], "b2": p.b2[idx]}  # w2/b2 rows in stored order
            for part in schema.PREDICTOR_PARTS:  # parked in files like the other resident tensors
                t = rows[part].float()
                writer.add_tensor(schema.predictor_tensor(kind, l, part), stage.put(t, "f32"), "f32",
                                  shape=tuple(t.shape))
            del p, rows
        del layer

        def bundles(l=l, perm=perm, block=BUNDLE_BLOCK):  # pulled at write time: the FFN weights are read then
            w_up, w_gate, w_down = w.ffn(l)
            for i in range(0, c.intermediate_size, block):
                ids = torch.from_numpy(perm[i : i + block].astype(np.int64))
                gate = w_gate[ids].float().numpy() if c.gated else None  # widened a block at a time
                yield pack_bundles(w_up[ids].float().numpy(), w_down[:, ids].float().numpy(), gate, dtype=dtype)

        writer.add_ffn_layer(d_model=c.hidden_size, n_neurons=c.intermediate_size, gated=c.gated, dtype=dtype,
                             bundle_bytes=header.bundle_bytes, permutation=schema.permutation_tensor(l),
                             bundles=bundles(), n_hot=n_hot, threshold=float(thresholds[l]))
    bar = tqdm(total=None, desc="writing layout", unit="B", unit_scale=True, disable=quiet, leave=False)

    def progress(done, total_raw):
        bar.total = total_raw
        bar.update(done - bar.n)

    try:
        writer.write(progress=progress)
    finally:
        bar.close()
        stage.close()
    return header
