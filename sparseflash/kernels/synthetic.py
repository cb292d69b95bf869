"""Random FFN layers with known weights, for kernel tests and the kernel benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseflash.kernels.bundles import pack_bundles
from sparseflash.kernels.kinds import FFNKind, ffn_kind
from sparseflash.kernels.storage import storage_name


@dataclass(frozen=True)
class SyntheticLayer:
    """A random FFN layer: float32 weights and the bundle matrix packed from them."""

    kind: FFNKind
    storage: str
    w_up: np.ndarray  # (n, d) float32
    w_down: np.ndarray  # (d, n) float32
    w_gate: np.ndarray | None  # (n, d) float32 or None
    bundles: np.ndarray  # (n, bundle_len) in storage
    gate_bias: np.ndarray | None  # (n,) float32 or None
    up_bias: np.ndarray | None  # (n,) float32 or None

    @property
    def d(self) -> int:
        """Hidden size."""
        return self.w_up.shape[1]

    @property
    def n(self) -> int:
        """Neurons (= slots of the bundle matrix)."""
        return self.w_up.shape[0]


def random_layer(
    d: int,
    n: int,
    kind: str | FFNKind = "relu2",
    storage: str = "f32",
    *,
    biases: bool = False,
    all_firing: bool = False,
    seed: int = 0,
) -> SyntheticLayer:
    """Random layer with weights ~ N(0, 1/d) so pre-activations are O(1).

    all_firing=True makes every up (and gate) pre-activation positive for inputs with
    non-negative entries, so no neuron has a == 0 (benchmarks then read every active bundle
    in full, like a perfect predictor would make them).
    """
    kind = ffn_kind(kind)
    storage = storage_name(storage)
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(d))

    def weights(shape: tuple[int, int]) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32) * scale
        return np.abs(w) if all_firing else w

    w_up = weights((n, d))
    w_gate = weights((n, d)) if kind.gated else None
    w_down = rng.standard_normal((d, n), dtype=np.float32) * scale
    gate_bias = rng.standard_normal(n, dtype=np.float32) * 0.1 if biases and kind.gated else None
    up_bias = rng.standard_normal(n, dtype=np.float32) * 0.1 if biases else None
    bundles = pack_bundles(w_up, w_down, w_gate, dtype=storage)
    return SyntheticLayer(kind, storage, w_up, w_down, w_gate, bundles, gate_bias, up_bias)


def random_active_set(n: int, share: float, seed: int = 0) -> np.ndarray:
    """round(share * n) distinct slots drawn uniformly at random, in random order (int64)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n)[: int(round(share * n))].astype(np.int64)
