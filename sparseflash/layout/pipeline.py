"""``sparseflash prepare``: checkpoint -> profile -> predictors -> layout, each step cached.

A prepared directory holds ``profile/``, ``predictors/``, ``model.sflash`` and ``prepare.json``
(the checkpoint hash and, per step, its parameters and the digests of the calibration and held-out
texts). A step is redone only when its output is missing or was made from another checkpoint, other
parameters or other texts. Before the layout is written, the
quality gate (layout/quality_gate.py) checks the predicted mode's held-out perplexity and picks the
strategy the layout records as the runtime's default (falling back to exact streaming).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sparseflash.errors import ArtefactError
from sparseflash.layout.memory_plan import MemoryPlan, fit_plan
from sparseflash.layout.params import BUNDLED_PARAMS, PrepareParams
from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir, file_hash
from sparseflash.model.source import open_source
from sparseflash.model.text import corpus_ids

BUNDLED_CALIBRATION = "calibration.txt.zst"
BUNDLED_HELDOUT = "heldout.txt.zst"


def cache_root() -> Path:
    """Where prepared layouts (and device models) are cached: $SPARSEFLASH_CACHE or ~/.cache/sparseflash."""
    return Path(os.environ.get("SPARSEFLASH_CACHE", Path.home() / ".cache" / "sparseflash"))


def prepared_dir(checkpoint: str | os.PathLike) -> Path:
    """The cache directory `prepare` uses for ``checkpoint``: its folder name and content hash."""
    return cache_root() / f"{os.path.basename(os.path.normpath(checkpoint))}-{checkpoint_hash(checkpoint)}"


def prepared_layout(checkpoint: str | os.PathLike | None, quiet: bool = False, log=print) -> Path:
    """The layout to stream ``checkpoint`` from: the bundled model prepares its own on first use;
    another checkpoint needs `sparseflash prepare` first."""
    if checkpoint is None:
        return prepare_bundled(quiet=quiet, log=log)
    path = prepared_dir(checkpoint) / "model.sflash"
    if not path.exists():
        raise ArtefactError(f"{checkpoint}: no prepared layout; run `sparseflash prepare -m {checkpoint} --corpus "
                            f"TEXT` first, or pass -m MODEL.sflash")
    return path


def bundled_texts() -> tuple[Path, Path]:
    d = default_model_dir()
    return d / BUNDLED_CALIBRATION, d / BUNDLED_HELDOUT


def _stamp(params: PrepareParams, step: str, texts: dict) -> dict:
    """What a step's output was made from: its parameters and the digests of the calibration and held-out
    texts (every step reads both, directly or through the one before)."""
    p = dataclasses.asdict(params)
    keep = {"profile": ("profile_tokens", "cett_tokens", "heldout_tokens", "ppl_p", "cett"),
            "predictors": ("profile_tokens", "heldout_tokens", "ppl_p", "cett", "predictor_tokens", "rank", "epochs",
                           "miss_recalls", "cached_share", "larger_miss_shares", "per_layer_cuts", "rank_spread",
                           "split_cache", "hot_fraction"),
            "layout": tuple(p)}[step]
    return json.loads(json.dumps({**{k: p[k] for k in keep}, "texts": texts}))  # as prepare.json reads back


class _Record:
    """prepare.json: the checkpoint hash and, per finished step, the parameters it was made with."""

    def __init__(self, path: Path, source_hash: str, params: PrepareParams, texts: dict):
        self.path, self.params, self.texts = path, params, texts
        self.steps = json.loads(path.read_text()) if path.exists() else {}
        if self.steps.get("source_hash") != source_hash:
            self.steps = {"source_hash": source_hash}

    @property
    def source_hash(self) -> str:
        return self.steps["source_hash"]

    def fresh(self, step: str, artefact: Path) -> bool:
        return artefact.exists() and self.steps.get(step) == _stamp(self.params, step, self.texts)

    def done(self, step: str, invalidates: tuple[str, ...] = ()) -> None:
        self.steps[step] = _stamp(self.params, step, self.texts)
        for later in invalidates:
            self.steps.pop(later, None)
        tmp = self.path.with_name(f".prepare.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.steps, indent=1))
        os.replace(tmp, self.path)


def prepare(checkpoint: str | os.PathLike | None, corpus: str | os.PathLike, heldout: str | os.PathLike,
            out_dir: str | os.PathLike, params: PrepareParams = PrepareParams(), quiet: bool = False,
            log=print, memory: int | None = None) -> Path:
    """Make (or reuse) the layout of ``checkpoint`` in ``out_dir``; returns the layout path.

    The checkpoint is opened lazily: every step reads it one layer at a time. Before any step the
    expected peak memory (layout/memory_plan.py) is logged and written to ``memory_plan.json``;
    with ``memory`` (bytes), hidden states go to temporary files if that keeps the peak under it,
    and a plan still over it is refused (SparseflashError with the numbers) before anything runs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _Record(out / "prepare.json", checkpoint_hash(checkpoint if checkpoint is not None else default_model_dir()),
                     params, {"corpus": file_hash(corpus), "heldout": file_hash(heldout)})
    artefacts = {"profile": out / "profile" / "profile.json", "predictors": out / "predictors" / "predictors.json",
                 "layout": out / "model.sflash"}
    if all(record.fresh(step, path) for step, path in artefacts.items()):
        return artefacts["layout"]
    with open_source(checkpoint) as source:
        warm_kernels()  # before the baseline: it counts their code, libraries and threads
        plan = fit_plan(source, params, memory, baseline=_rss())
        log(f"[prepare] {plan.text()}")
        (out / "memory_plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
        _prepare_steps(source, corpus, heldout, out, params, record, plan, quiet, log)
    return artefacts["layout"]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def warm_kernels() -> None:
    """Compile (or load from Numba's cache) the profile's native kernels on tiny inputs, so that the
    plan's baseline counts their code and the libraries and threads they bring in (~50 MiB of RSS
    here, 0.2 s), which no stage's figure holds (docs/prepare.md)."""
    import numpy as np
    import torch

    from sparseflash.layout.cett_curve import cett_curve
    from sparseflash.layout.coactivation import accumulate_coactivation, active_lists
    from sparseflash.layout.masks import pack

    a = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    for w in (torch.ones(4, 3), torch.ones(4, 3, dtype=torch.bfloat16)):  # float32 and bf16 W_down
        cett_curve(a, w, np.array([0.0, 0.5]))
    packed = pack(np.array([[True, False, True], [True, True, False]]))
    accumulate_coactivation(packed, 3, np.zeros((3, 3), np.int64), lists=active_lists(packed, 3))


def _prepare_steps(source, corpus, heldout, out: Path, params: PrepareParams, record: _Record,
                   plan: MemoryPlan, quiet, log) -> None:
    from sparseflash.layout.build import build_layout
    from sparseflash.layout.params import PredictorParams, ProfileParams, TrainParams
    from sparseflash.layout.predictors_build import build_predictors
    from sparseflash.layout.profile import load_profile, run_profile
    from sparseflash.layout.quality_gate import decide_gate, gate_line
    tokenizer = source.tokenizer()
    calib = corpus_ids(corpus, tokenizer, max(params.profile_tokens, params.predictor_tokens))
    held = corpus_ids(heldout, tokenizer, params.heldout_tokens)
    if not record.fresh("profile", out / "profile" / "profile.json"):
        log(f"[prepare 1/3] profiling on {params.profile_tokens} tokens ...")
        run_profile(source, calib[: params.profile_tokens], held, out / "profile",
                    ProfileParams(tokens=params.profile_tokens, cett_bound=params.cett, ppl_p=params.ppl_p,
                                  cett_tokens=plan.cett_tokens, ppl_tokens=params.heldout_tokens,
                                  batch=plan.batch, spill_bytes=plan.spill_bytes),
                    record.source_hash, quiet)
        record.done("profile", invalidates=("predictors", "layout"))
    if not record.fresh("predictors", out / "predictors" / "predictors.json"):
        log(f"[prepare 2/3] training predictors on {params.predictor_tokens} tokens ...")
        build_predictors(source, load_profile(out / "profile"), out / "profile", calib[: params.predictor_tokens],
                         held, out / "predictors",
                         PredictorParams(tokens=params.predictor_tokens, val_tokens=params.heldout_tokens,
                                         rank=params.rank, train=TrainParams(epochs=params.epochs),
                                         miss_recalls=params.miss_recalls, cached_share=params.cached_share,
                                         larger_miss_shares=params.larger_miss_shares,
                                         probe_budget=PredictorParams.probe_budget if params.per_layer_cuts else 0.0,
                                         mix_bound_pct=params.gate_rise_pct, rank_spread=params.rank_spread,
                                         split_cache=params.split_cache, hot_fraction=params.hot_fraction,
                                         batch=plan.batch, spill_bytes=plan.spill_bytes,
                                         train_jobs=plan.train_jobs),
                         record.source_hash, quiet)
        record.done("predictors", invalidates=("layout",))
    if not record.fresh("layout", out / "model.sflash"):
        gate = decide_gate(json.loads((out / "predictors" / "predictors.json").read_text()),
                           load_profile(out / "profile"), params.gate_rise_pct, params.dense_sparsity,
                           heldout_hash=record.texts["heldout"])
        log(f"[prepare] {gate_line(gate)}")
        log(f"[prepare 3/3] writing the {params.order}-ordered layout ...")
        build_layout(source, out / "profile", out / "model.sflash", out / "predictors",
                     params.layout_params(), source_hash=record.source_hash, quiet=quiet, gate=gate)
        record.done("layout")


def prepare_bundled(quiet: bool = False, log=print) -> Path:
    """The bundled model's layout, prepared on first use in the cache directory."""
    calib, held = bundled_texts()
    source = checkpoint_hash(default_model_dir())
    return prepare(None, calib, held, cache_root() / f"tiny-relu2-{source}", BUNDLED_PARAMS, quiet, log)
