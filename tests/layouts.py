"""Small layout files written straight from tiny models (no profile needed), and bare FFN regions of
random bytes for the readers' tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tiny_models import make_hf_model, save_hf_model

from sparseflash.layout.build import write_layout
from sparseflash.model.loader import open_dense


def tiny_layout(tmp: Path, family: str = "nemotron", dtype: str = "f32", n_hot: int = 8, seed: int = 0,
                preds: dict | None = None, strategy: str = "threshold", resident_dtype: str | None = None,
                layers: int = 2, gate: dict | None = None, demand=None, name: str = ""):
    """(dense model, layout path) for a random model of ``family`` (``layers`` deep) with random neuron orders;
    ``demand``: the cache demand recorded with the predictors (layout/schema_cache.CacheDemand)."""
    folder = save_hf_model(make_hf_model(family, seed, layers), tmp / f"{family}-ckpt")
    model = open_dense(folder)
    rng = np.random.default_rng(seed)
    c = model.config
    perms = [rng.permutation(c.intermediate_size).astype(np.int32) for _ in range(c.num_layers)]
    path = tmp / f"{family}-{dtype}-{resident_dtype or 'same'}{name}.sflash"
    write_layout(model, path, perms, n_hot, [0.0] * c.num_layers, dtype, preds, strategy, quiet=True,
                 resident_dtype=resident_dtype, gate=gate, cache_demand=demand)
    return model, path


REGION_NEURONS, REGION_OFFSET = 97, 3 * 4096


def region_file(tmp_path: Path, bundle_bytes: int, tail: int = 4096):
    """(path, region record, bundles (REGION_NEURONS, bundle_bytes) uint8): a file of random bundles at
    REGION_OFFSET, ``tail`` zero bytes after them."""
    rng = np.random.default_rng(bundle_bytes)
    data = rng.integers(0, 256, REGION_NEURONS * bundle_bytes, dtype=np.uint8)
    path = tmp_path / f"region-{bundle_bytes}.bin"
    path.write_bytes(bytes(REGION_OFFSET) + data.tobytes() + bytes(tail))
    region = SimpleNamespace(offset=REGION_OFFSET, bundle_bytes=bundle_bytes, length=REGION_NEURONS * bundle_bytes)
    return str(path), region, data.reshape(REGION_NEURONS, bundle_bytes)


def short_region_file(tmp_path: Path, bundle_bytes: int, ends_in: int) -> tuple[str, SimpleNamespace, np.ndarray]:
    """region_file's (path, region, bundles) with the file cut 100 bytes into bundle ``ends_in``."""
    path, region, expected = region_file(tmp_path, bundle_bytes, tail=0)
    short = tmp_path / "short.bin"
    short.write_bytes(open(path, "rb").read()[: REGION_OFFSET + ends_in * bundle_bytes + 100])
    return str(short), region, expected


def f16_region_file(tmp_path: Path, bundle_bytes: int, n: int, nan_at: tuple[int, int]
                    ) -> tuple[Path, SimpleNamespace, np.ndarray]:
    """(path, region with digests, values (n, bundle_bytes // 2) float16) of random f16 bundles at
    REGION_OFFSET, one value NaN at ``nan_at`` (a bundle whose digest matches, yet not finite)."""
    from sparseflash.layout.format import record_digests

    values = np.random.default_rng(3).standard_normal((n, bundle_bytes // 2)).astype(np.float16)
    values[nan_at] = np.nan
    path = tmp_path / "f16.bin"
    path.write_bytes(bytes(REGION_OFFSET) + values.tobytes() + bytes(4096))
    region = SimpleNamespace(offset=REGION_OFFSET, bundle_bytes=bundle_bytes, length=n * bundle_bytes, n_neurons=n,
                             index=0, dtype="f16", digests=record_digests(values))
    return path, region, values
