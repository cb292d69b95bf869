"""``sparseflash prepare``: checkpoint -> profile -> predictors -> layout, each step cached.

A prepared directory holds ``profile/``, ``predictors/``, ``model.sflash`` and ``prepare.json``
(the checkpoint hash and the parameters of every step). A step is redone only when its output is
missing or was made from another checkpoint or other parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sparseflash.errors import ArtefactError
from sparseflash.layout.params import BUNDLED_PARAMS, PrepareParams
from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir
from sparseflash.model.loader import open_dense
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


def _stamp(params: PrepareParams, step: str) -> dict:
    p = dataclasses.asdict(params)
    keep = {"profile": ("profile_tokens", "cett_tokens", "heldout_tokens", "ppl_p", "cett"),
            "predictors": ("profile_tokens", "heldout_tokens", "ppl_p", "cett", "predictor_tokens", "rank", "epochs"),
            "layout": tuple(p)}[step]
    return {k: p[k] for k in keep}


def prepare(checkpoint: str | os.PathLike | None, corpus: str | os.PathLike, heldout: str | os.PathLike,
            out_dir: str | os.PathLike, params: PrepareParams = PrepareParams(), quiet: bool = False,
            log=print) -> Path:
    """Make (or reuse) the layout of ``checkpoint`` in ``out_dir``; returns the layout path."""
    from sparseflash.layout.build import build_layout
    from sparseflash.layout.params import PredictorParams, ProfileParams, TrainParams
    from sparseflash.layout.predictors_build import build_predictors
    from sparseflash.layout.profile import load_profile, run_profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = checkpoint_hash(checkpoint if checkpoint is not None else default_model_dir())
    record_path = out / "prepare.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("source_hash") != source:
        record = {"source_hash": source}

    def fresh(step: str, artefact: Path) -> bool:
        return artefact.exists() and record.get(step) == _stamp(params, step)

    def done(step: str) -> None:
        record[step] = _stamp(params, step)
        tmp = record_path.with_name(f".prepare.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, record_path)

    model = open_dense(checkpoint)
    layout_path = out / "model.sflash"
    if fresh("profile", out / "profile" / "profile.json") and fresh("predictors", out / "predictors" / "predictors.json") \
            and fresh("layout", layout_path):
        return layout_path
    need = max(params.profile_tokens, params.predictor_tokens)
    calib = corpus_ids(corpus, model.tokenizer, need)
    held = corpus_ids(heldout, model.tokenizer, params.heldout_tokens)
    if not fresh("profile", out / "profile" / "profile.json"):
        log(f"[prepare 1/3] profiling on {params.profile_tokens} tokens ...")
        run_profile(model, calib[: params.profile_tokens], held,
                    out / "profile", ProfileParams(tokens=params.profile_tokens, cett_bound=params.cett,
                                                   ppl_p=params.ppl_p, cett_tokens=params.cett_tokens,
                                                   ppl_tokens=params.heldout_tokens), source, quiet)
        done("profile")
        record.pop("predictors", None)
        record.pop("layout", None)
    if not fresh("predictors", out / "predictors" / "predictors.json"):
        log(f"[prepare 2/3] training predictors on {params.predictor_tokens} tokens ...")
        build_predictors(model, load_profile(out / "profile"), out / "profile", calib[: params.predictor_tokens], held,
                         out / "predictors", PredictorParams(tokens=params.predictor_tokens,
                                                             val_tokens=params.heldout_tokens, rank=params.rank,
                                                             train=TrainParams(epochs=params.epochs)),
                         source, quiet)
        done("predictors")
        record.pop("layout", None)
    if not fresh("layout", layout_path):
        log(f"[prepare 3/3] writing the {params.order}-ordered layout ...")
        build_layout(model, out / "profile", layout_path, out / "predictors", params.layout_params(),
                     source_hash=source, quiet=quiet)
        done("layout")
    return layout_path


def prepare_bundled(quiet: bool = False, log=print) -> Path:
    """The bundled model's layout, prepared on first use in the cache directory."""
    calib, held = bundled_texts()
    source = checkpoint_hash(default_model_dir())
    return prepare(None, calib, held, cache_root() / f"tiny-relu2-{source}", BUNDLED_PARAMS, quiet, log)
