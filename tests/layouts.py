"""Small layout files written straight from tiny models (no profile needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import make_hf_model, save_hf_model

from sparseflash.layout.build import write_layout
from sparseflash.model.loader import open_dense


def tiny_layout(tmp: Path, family: str = "nemotron", dtype: str = "f32", n_hot: int = 8, seed: int = 0,
                preds: dict | None = None, strategy: str = "threshold", resident_dtype: str | None = None,
                layers: int = 2, gate: dict | None = None):
    """(dense model, layout path) for a random model of ``family`` (``layers`` deep) with random neuron orders."""
    folder = save_hf_model(make_hf_model(family, seed, layers), tmp / f"{family}-ckpt")
    model = open_dense(folder)
    rng = np.random.default_rng(seed)
    c = model.config
    perms = [rng.permutation(c.intermediate_size).astype(np.int32) for _ in range(c.num_layers)]
    path = tmp / f"{family}-{dtype}-{resident_dtype or 'same'}.sflash"
    write_layout(model, path, perms, n_hot, [0.0] * c.num_layers, dtype, preds, strategy, quiet=True,
                 resident_dtype=resident_dtype, gate=gate)
    return model, path
