"""Watching FFN neurons during a dense forward: magnitudes and active sets, per layer.

Every stage that looks at neuron activations (profiling, predictor recording, quality checks,
reports) takes them from a ``NeuronTap``: it holds each layer's down-column norms and thresholds,
applies the layout schema's one definition of magnitude and "active", and builds the dense model
whose FFN hook hands it each layer's activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseflash.layout.schema import active_mask, neuron_magnitude
from sparseflash.model.ffn import ActivationHook, DenseFFN
from sparseflash.model.transformer import Transformer
from sparseflash.model.weights import ModelWeights


class NeuronTap:
    """Down-column norms (and, if given, thresholds) of every FFN layer of ``weights``."""

    def __init__(self, weights: ModelWeights, thresholds: Sequence[float] | None = None):
        self.weights = weights
        self.down_norms = [torch.linalg.vector_norm(w.w_down, dim=0) for w in weights.layers]  # (neurons,)
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]

    def magnitude(self, layer: int, activations: torch.Tensor) -> torch.Tensor:
        """(tokens, neurons) |a_i| * ||W_down[:, i]||."""
        return neuron_magnitude(activations, self.down_norms[layer])

    def active(self, layer: int, activations: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """(tokens, neurons) bool active set at ``threshold`` (default: the tap's threshold of the layer)."""
        t = self.thresholds[layer] if threshold is None else threshold
        return active_mask(self.magnitude(layer, activations), t)

    def masking_hook(self, thresholds: Sequence[float] | None = None) -> ActivationHook:
        """A hook that keeps only active neurons (inactive activations set to 0)."""
        thr = self.thresholds if thresholds is None else list(thresholds)
        return lambda layer, x, a: a * self.active(layer, a, thr[layer])

    def transformer(self, config, hook: ActivationHook | None) -> Transformer:
        """The dense model over the tap's weights with ``hook`` on every FFN."""
        return Transformer(config, self.weights, DenseFFN(self.weights.layers, config.activation, config.gated, hook))
