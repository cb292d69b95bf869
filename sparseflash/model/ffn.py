"""The FFN of one layer, with the hook every later stage uses to see or change neuron activations.

Neuron i's activation a_i is the value after the activation function (times the up projection
for gated FFNs); the FFN output is sum_i a_i * W_down[:, i] (+ down bias).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparseflash.model.weights import LayerWeights

# hook(layer, ffn_input (tokens, d), activations (tokens, neurons)) -> replacement activations or None
ActivationHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation function by name, as the checkpoint defines it. The kernels keep their own
    definition (kernels/dense.py): this reference is what their results are checked against."""
    if activation == "relu2":
        return F.relu(z).square()
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def neuron_activations(layer: LayerWeights, x: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """Activations (..., neurons) of the FFN for inputs x (..., d) that are already normalised."""
    up = F.linear(x, layer.w_up, layer.b_up)
    if gated:
        return activate(F.linear(x, layer.w_gate, layer.b_gate), activation) * up
    return activate(up, activation)


class DenseFFN:
    """Dense FFN over in-memory weights; ``hook`` sees (and may replace) every layer's activations."""

    def __init__(self, layers: list[LayerWeights], activation: str, gated: bool, hook: ActivationHook | None = None):
        self.layers = layers
        self.activation = activation
        self.gated = gated
        self.hook = hook

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        a = neuron_activations(w, x, self.activation, self.gated)
        if self.hook is not None:
            replaced = self.hook(layer, x, a)
            if replaced is not None:
                a = replaced
        return F.linear(a, w.w_down, w.b_down)
