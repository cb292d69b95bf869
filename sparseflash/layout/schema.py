"""The model contract on top of the .sflash container: what a sparseflash model layout holds.

``format_*`` defines the container (preamble, resident tensors, FFN regions of fixed-size neuron
records, index). This module defines what a *model* layout puts in it, and is the one place the
writer (layout/build.py) and the runtime (runtime/layout_model.py, runtime/predict.py) take it from:

- the versioned header (``ModelHeader``), validated when a file is opened (``read_header``);
- tensor names: resident weights, per-neuron biases, permutations, predictors;
- the tensors a header implies, with dtypes and shapes (``expected_tensors``, ``check_layout``);
- the bundle byte layout: which parts, in which order, how many bytes (``bundle_bytes``);
- what "active" means (``neuron_magnitude``, ``active_mask``): one definition for profiling,
  predictors, reports and the runtime;
- dtype helpers (storage tag <-> float32) and the predictor forward the stored tensors mean.

Spec: docs/layout-format.md, "Model layouts". Imports nothing from sparseflash but its siblings format_spec, schema_check, schema_gate and schema_cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .format_spec import DTYPES, QUANT_TYPES, STORAGE_DTYPES, FfnLayer, TensorEntry
from .schema_cache import CacheDemand, read_demand
from .schema_check import REBUILD, SchemaError, _Check  # noqa: F401  (SchemaError, REBUILD: part of this API)
from .schema_gate import read_gate

LAYOUT_KIND = "sparseflash-layout"
SCHEMA_VERSION = 2  # of the header and tensor naming below; bump when either changes meaning
# 2: resident_dtype (resident matrices may be quantized), quantized bundle storage
STRATEGIES = ("topk", "threshold")  # how stored predictors turn scores into an active set


# ---- tensor names --------------------------------------------------------------------------

EMBED, FINAL_NORM_W, FINAL_NORM_B, LM_HEAD = "embed", "final_norm_w", "final_norm_b", "lm_head"
# per-layer resident tensors, in the order the writer stores them (matrices, then vectors)
LAYER_FIELDS = ("attn_norm_w", "attn_norm_b", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
                "ffn_norm_w", "ffn_norm_b", "b_down")
NEURON_BIAS_FIELDS = ("b_up", "b_gate")  # per-neuron, f32, rows in stored order
PREDICTOR_PARTS = ("w1", "b1", "w2", "b2")  # w2/b2 rows in stored order
PREDICTOR_KINDS = ("layer", "lookahead")  # lookahead: layer l's predictor fed with layer l-1's input


def layer_tensor(layer: int, name: str) -> str:
    """Name of a per-layer tensor: ``layers.{layer}.{name}`` (name in LAYER_FIELDS or NEURON_BIAS_FIELDS)."""
    return f"layers.{layer}.{name}"


def permutation_tensor(layer: int) -> str:
    """i32 (n_neurons,): stored position -> checkpoint neuron id."""
    return f"layers.{layer}.perm"


def predictor_tensor(kind: str, layer: int, part: str) -> str:
    return f"pred.{kind}.{layer}.{part}"


# ---- bundles -------------------------------------------------------------------------------

def bundle_parts(gated: bool) -> tuple[str, ...]:
    """A neuron's bundle is these d-long vectors back to back: gate/up rows and the down column."""
    return ("gate", "up", "down") if gated else ("up", "down")


def bundle_len(d_model: int, gated: bool) -> int:
    """Elements of one bundle row."""
    return len(bundle_parts(gated)) * d_model


def part_bytes(d_model: int, dtype: str) -> int:
    """Bytes of one d-long bundle part (or resident-matrix row) in storage ``dtype``: d values, or
    for q8/q4 d/32 groups, each a float16 scale then its quantized values (kernels/quant.py)."""
    if dtype in QUANT_TYPES:
        group, group_bytes = QUANT_TYPES[dtype]
        if d_model % group:
            raise ValueError(f"{dtype} storage needs a hidden size that is a multiple of {group}, got {d_model}")
        return d_model // group * group_bytes
    return d_model * DTYPES[dtype].itemsize


def bundle_bytes(d_model: int, gated: bool, dtype: str) -> int:
    """Bytes of one neuron's bundle in storage ``dtype``."""
    return len(bundle_parts(gated)) * part_bytes(d_model, dtype)


# ---- what "active" means -------------------------------------------------------------------

def neuron_magnitude(activations, down_norm):
    """|a_i| * ||W_down[:, i]||: how much neuron i adds to the FFN output (numpy or torch)."""
    return abs(activations) * down_norm


def active_mask(magnitude, threshold: float):
    """Active: magnitude >= the layer's threshold and > 0 (an exactly-zero neuron adds nothing,
    so it is never active, even at threshold 0). Works on numpy arrays and torch tensors."""
    return (magnitude >= threshold) & (magnitude > 0)


# ---- dtypes --------------------------------------------------------------------------------

def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Values stored as ``dtype`` (bf16 as uint16 bits) as float32."""
    if dtype == "bf16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw).astype(np.float32, copy=False)


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as stored under ``dtype`` (bf16: round to nearest even, kept as uint16 bits)."""
    if dtype == "f32":
        return values.float().numpy()
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.uint16).numpy()
    if dtype == "f16":
        return values.to(torch.float16).numpy()
    raise ValueError(f"no storage dtype {dtype!r} (choose from {', '.join(STORAGE_DTYPES)})")


# ---- predictors ----------------------------------------------------------------------------

def predictor_logits(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """Scores (tokens, neurons) of a stored predictor: W2 · relu(W1 · x + b1) + b2 (pre-sigmoid)."""
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


@dataclass(frozen=True)
class PredictorSpec:
    """How one layer's stored predictor picks neurons: top-k count and logit cut; rank of W1; the cut a
    neuron not in memory must also pass to be read (cost-aware selection; None: no such cut)."""

    topk: int
    cut: float
    rank: int
    miss_cut: float | None = None
    # with the miss cut: the (lower) cut a neuron in memory must pass to be computed; None: ``cut``
    cached_cut: float | None = None
    # (share, cut): the miss cut validated with a cache of that larger share of the layer (ascending shares)
    larger_miss_cuts: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class PredictorsHeader:
    strategy: str  # the runtime's default: topk | threshold
    layers: tuple[PredictorSpec, ...]
    lookahead: tuple[PredictorSpec | None, ...]  # None for layer 0 and where none was trained
    report: dict | None = None  # measured quality (free-form, shown by inspect)
    # prepare's quality gate (layout/quality_gate.py): its "strategy" (topk | threshold | all) is the
    # runtime's default in place of ``strategy``; the rest is what it measured (shown by run and inspect)
    gate: dict | None = None
    # per layer, misses per token against cache size (layout/schema_cache.py): how a run splits its cache
    cache_demand: CacheDemand | None = None

    @property
    def default_strategy(self) -> str:
        """The strategy a run uses unless told otherwise: the gate's, else the predictors' own."""
        return self.gate["strategy"] if self.gate is not None else self.strategy

    def to_json(self) -> dict:
        def spec(p):
            if p is None:
                return None
            out = {"topk": p.topk, "cut": p.cut, "rank": p.rank}
            if p.miss_cut is not None:
                out["miss_cut"] = p.miss_cut
            if p.cached_cut is not None:
                out["cached_cut"] = p.cached_cut
            if p.larger_miss_cuts:
                out["larger_miss_cuts"] = [list(pair) for pair in p.larger_miss_cuts]
            return out

        out = {"strategy": self.strategy, "layers": [spec(p) for p in self.layers],
               "lookahead": [spec(p) for p in self.lookahead], "report": self.report}
        if self.gate is not None:
            out["gate"] = self.gate
        if self.cache_demand is not None:
            out["cache_demand"] = self.cache_demand.to_json()
        return out


# ---- the header ----------------------------------------------------------------------------

MODEL_INT_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "vocab_size")
MODEL_BOOL_FIELDS = ("gated", "tie_word_embeddings", "attention_bias", "mlp_bias")
NORMS = ("layernorm1p", "rmsnorm")


@dataclass(frozen=True)
class ModelHeader:
    """The JSON header of a model layout. ``model`` is the model config as a dict (ModelConfig's
    fields; model/config.py validates its values); ``provenance`` records how the layout was made
    (profile parameters, neuron order and its measurements, hot fraction) and is only shown."""

    model: dict
    tokenizer_json: str
    source_hash: str  # the checkpoint's content hash (model/checkpoint.py:checkpoint_hash)
    dtype: str  # storage dtype of every bundle
    n_hot: int  # hot-region neurons per layer
    predictors: PredictorsHeader | None = None
    provenance: dict = field(default_factory=dict)
    resident_dtype: str = "f16"  # storage of resident matrices (embeddings, attention, head); vectors are f32
    schema_version: int = SCHEMA_VERSION

    @property
    def dims(self) -> dict:
        """The model's integer and boolean shape fields and its norm."""
        return {k: self.model[k] for k in (*MODEL_INT_FIELDS, *MODEL_BOOL_FIELDS, "norm")}

    @property
    def bundle_bytes(self) -> int:
        return bundle_bytes(self.model["hidden_size"], self.model["gated"], self.dtype)

    def to_json(self) -> dict:
        return {"kind": LAYOUT_KIND, "schema_version": self.schema_version, "model": self.model,
                "tokenizer_json": self.tokenizer_json, "source_hash": self.source_hash, "dtype": self.dtype,
                "resident_dtype": self.resident_dtype, "n_hot": self.n_hot, "bundle_bytes": self.bundle_bytes,
                "predictors": None if self.predictors is None else self.predictors.to_json(),
                "provenance": self.provenance}


HEADER_KEYS = ("kind", "schema_version", "model", "tokenizer_json", "source_hash", "dtype", "resident_dtype", "n_hot",
               "bundle_bytes", "predictors", "provenance")


def read_header(path: object, doc: dict) -> ModelHeader:
    """Validate a parsed layout header; raises SchemaError naming the field (one line)."""
    c = _Check(path)
    c.object(doc, "header")
    if doc.get("kind") != LAYOUT_KIND:
        c.fail("header.kind", "not a sparseflash model layout", doc.get("kind"))
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        c.fail("header.schema_version", f"this sparseflash reads model layouts of schema version {SCHEMA_VERSION}; "
               f"{REBUILD}", version)
    c.object(doc, "header", HEADER_KEYS)
    model = c.object(doc["model"], "header.model")
    for k in MODEL_INT_FIELDS:
        c.int(model.get(k), f"header.model.{k}", 1)
    for k in MODEL_BOOL_FIELDS:
        if not isinstance(model.get(k), bool):
            c.fail(f"header.model.{k}", "must be true or false", model.get(k))
    c.str(model.get("norm"), "header.model.norm", NORMS)
    dtype = c.str(doc["dtype"], "header.dtype", STORAGE_DTYPES)
    resident_dtype = c.str(doc["resident_dtype"], "header.resident_dtype", STORAGE_DTYPES)
    n = model["intermediate_size"]
    n_hot = c.int(doc["n_hot"], "header.n_hot", 0, n)
    try:
        expected = bundle_bytes(model["hidden_size"], model["gated"], dtype)
    except ValueError as e:
        c.fail("header.dtype", str(e), dtype)
    if doc["bundle_bytes"] != expected:
        c.fail("header.bundle_bytes", f"must be {len(bundle_parts(model['gated']))} * hidden_size * itemsize "
               f"= {expected}", doc["bundle_bytes"])
    predictors = None if doc["predictors"] is None else _read_predictors(c, doc["predictors"], model)
    provenance = c.object(doc["provenance"], "header.provenance")
    return ModelHeader(model, c.str(doc["tokenizer_json"], "header.tokenizer_json"),
                       c.str(doc["source_hash"], "header.source_hash"), dtype, n_hot, predictors, provenance,
                       resident_dtype)


def _read_predictors(c: _Check, doc, model: dict) -> PredictorsHeader:
    c.object(doc, "header.predictors", ("strategy", "layers", "lookahead", "report", "gate", "cache_demand"),
             optional=("report", "gate", "cache_demand"))
    strategy = c.str(doc["strategy"], "header.predictors.strategy", STRATEGIES)
    layers_n, n = model["num_layers"], model["intermediate_size"]

    def spec(entry, where: str, optional: bool) -> PredictorSpec | None:
        if entry is None and optional:
            return None
        optional = ("miss_cut", "cached_cut", "larger_miss_cuts")
        c.object(entry, where, ("topk", "cut", "rank") + optional, optional=optional)
        miss, cached, cut = entry.get("miss_cut"), entry.get("cached_cut"), c.number(entry["cut"], f"{where}.cut")
        larger = entry.get("larger_miss_cuts", [])
        if not isinstance(larger, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in larger):
            c.fail(f"{where}.larger_miss_cuts", "must be a list of [share, cut] pairs", larger)
        larger = tuple((c.number(s, f"{where}.larger_miss_cuts"), c.number(v, f"{where}.larger_miss_cuts"))
                       for s, v in larger)
        if any(not 0 < s <= 1 for s, _ in larger) or list(larger) != sorted(larger):
            c.fail(f"{where}.larger_miss_cuts", "shares must be in (0, 1], ascending", entry["larger_miss_cuts"])
        if cached is not None and ((miss is None and not larger) or c.number(cached, f"{where}.cached_cut") > cut):
            c.fail(f"{where}.cached_cut", "needs a miss cut and must be at most the cut", cached)
        # a writer keeps at least one neuron (layout/predictors_build.py); top-k 0 would run only the hot ones
        return PredictorSpec(c.int(entry["topk"], f"{where}.topk", 1, n), cut,
                             c.int(entry["rank"], f"{where}.rank", 1, 1 << 20),
                             None if miss is None else c.number(miss, f"{where}.miss_cut"),
                             None if cached is None else float(cached), larger)

    for key in ("layers", "lookahead"):
        if not isinstance(doc[key], list) or len(doc[key]) != layers_n:
            c.fail(f"header.predictors.{key}", f"must be a list of {layers_n} entries (one per layer)",
                   type(doc[key]).__name__ if not isinstance(doc[key], list) else len(doc[key]))
    own = tuple(spec(e, f"header.predictors.layers[{l}]", False) for l, e in enumerate(doc["layers"]))
    ahead = tuple(spec(e, f"header.predictors.lookahead[{l}]", True) for l, e in enumerate(doc["lookahead"]))
    if ahead and ahead[0] is not None:
        c.fail("header.predictors.lookahead[0]", "layer 0 has no previous layer to look ahead from")
    report = doc.get("report")
    if report is not None:
        c.object(report, "header.predictors.report")
    gate = doc.get("gate")
    if gate is not None:
        read_gate(c, gate, STRATEGIES)
    demand = doc.get("cache_demand")
    if demand is not None:
        demand = read_demand(c, demand, layers_n)
    return PredictorsHeader(strategy, own, ahead, report, gate, demand)


# ---- the tensors a header implies ----------------------------------------------------------

def _tensor_shapes(header: ModelHeader) -> tuple[dict, set[str]]:
    """(name -> (allowed dtype tags, shape) for every tensor a model layout may hold, the required names)."""
    m = header.dims
    d, n, vocab = m["hidden_size"], m["intermediate_size"], m["vocab_size"]
    q_out, kv_out = m["num_heads"] * m["head_dim"], m["num_kv_heads"] * m["head_dim"]
    vec, mat = ("f32",), (header.resident_dtype,)
    layernorm = m["norm"] == "layernorm1p"
    shapes = {EMBED: (mat, (vocab, d)), FINAL_NORM_W: (vec, (d,)), FINAL_NORM_B: (vec, (d,)),
              LM_HEAD: (mat, (vocab, d))}
    required = {EMBED, FINAL_NORM_W}
    required |= {FINAL_NORM_B} if layernorm else set()
    required |= set() if m["tie_word_embeddings"] else {LM_HEAD}
    per_layer = {"attn_norm_w": (vec, (d,)), "attn_norm_b": (vec, (d,)), "wq": (mat, (q_out, d)),
                 "wk": (mat, (kv_out, d)), "wv": (mat, (kv_out, d)), "wo": (mat, (d, q_out)),
                 "bq": (vec, (q_out,)), "bk": (vec, (kv_out,)), "bv": (vec, (kv_out,)), "bo": (vec, (d,)),
                 "ffn_norm_w": (vec, (d,)), "ffn_norm_b": (vec, (d,)), "b_down": (vec, (d,)),
                 "b_up": (vec, (n,)), "b_gate": (vec, (n,))}
    needed = {"attn_norm_w", "wq", "wk", "wv", "wo", "ffn_norm_w"}
    needed |= {"attn_norm_b", "ffn_norm_b"} if layernorm else set()
    needed |= {"bq", "bk", "bv"} if m["attention_bias"] else set()
    needed |= ({"b_down", "b_up"} | ({"b_gate"} if m["gated"] else set())) if m["mlp_bias"] else set()
    if not m["gated"]:
        del per_layer["b_gate"]
    for l in range(m["num_layers"]):
        shapes.update({layer_tensor(l, k): v for k, v in per_layer.items()})
        required |= {layer_tensor(l, k) for k in needed}
        shapes[permutation_tensor(l)] = (("i32",), (n,))
        required.add(permutation_tensor(l))
        if header.predictors is None:
            continue
        for kind, spec in (("layer", header.predictors.layers[l]), ("lookahead", header.predictors.lookahead[l])):
            if spec is not None:
                r = spec.rank
                for part, shape in zip(PREDICTOR_PARTS, ((r, d), (r,), (n, r), (n,))):
                    shapes[predictor_tensor(kind, l, part)] = (vec, shape)
                    required.add(predictor_tensor(kind, l, part))
    return shapes, required


def expected_tensors(header: ModelHeader) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every tensor the runtime needs: name -> (allowed dtype tags, shape)."""
    shapes, required = _tensor_shapes(header)
    return {name: shapes[name] for name in shapes if name in required}


def check_layout(path: object, header: ModelHeader, tensors: dict[str, TensorEntry],
                 layers: tuple[FfnLayer, ...]) -> None:
    """Cross-check a header against the file's tensors and FFN regions (one-line SchemaError):
    every required tensor present, every model tensor present with its dtype and shape, one FFN
    region per layer matching the header."""
    c = _Check(path)
    shapes, required = _tensor_shapes(header)
    for name in sorted(required - set(tensors)):
        c.fail(f"tensor {name!r}", f"is missing; {REBUILD}")
    for name, t in tensors.items():
        if name not in shapes:
            continue
        dtypes, shape = shapes[name]
        if t.dtype not in dtypes or t.shape != shape:
            c.fail(f"tensor {name!r}", f"must be {'/'.join(dtypes)} of shape {list(shape)}",
                   f"{t.dtype} {list(t.shape)}")
    m = header.dims
    if len(layers) != m["num_layers"]:
        c.fail("index.layers", f"must hold one FFN region per layer ({m['num_layers']})", len(layers))
    want = {"d_model": m["hidden_size"], "n_neurons": m["intermediate_size"], "gated": m["gated"],
            "dtype": header.dtype, "bundle_bytes": header.bundle_bytes, "n_hot": header.n_hot}
    for region in layers:
        for key, value in want.items():
            if getattr(region, key) != value:
                c.fail(f"index.layers[{region.index}].{key}", f"must match the header ({value})",
                       getattr(region, key))
        if region.permutation != permutation_tensor(region.index):
            c.fail(f"index.layers[{region.index}].permutation", f"must be {permutation_tensor(region.index)!r}",
                   region.permutation)
