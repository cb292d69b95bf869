"""The compute step of the streaming engine: the sparse FFN of one layer over cache slots it is
handed (the fetcher has already filled them). On the host it runs the Numba kernel over the
layer's host slots; with a device cache, the numba.cuda kernel over the device slots, on the
compute stream, after the layer's uploads (runtime/gpu.py orders the two with events).

With ``activations`` it returns the kernel's activations (tokens, slots) on the host, so the engine
can count the neurons that truly fired (layout/schema.py's definition of active); without, it returns
None and, on the GPU, does not wait for the kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.layout.schema import active_mask, neuron_magnitude
from sparseflash.runtime.cache import NeuronCache


class SparseCompute:
    """y += FFN(x) over chosen slots, for every layer of one model."""

    def __init__(self, kernel, kind: str, storage: str, b_up: list, b_gate: list, device_cache=None):
        """``kernel``: a kernels Backend; ``b_up``/``b_gate``: per layer, per-neuron float32 biases in
        stored order (or None); ``device_cache``: the DeviceCache whose slots hold the bundles (GPU)."""
        self.kernel, self.kind, self.storage = kernel, kind, storage
        self.b_up, self.b_gate, self.gpu = b_up, b_gate, device_cache

    def __call__(self, layer: int, x: torch.Tensor, cache: NeuronCache, slots: np.ndarray, y: torch.Tensor,
                 activations: bool = True) -> np.ndarray | None:
        """Add the FFN output of ``slots`` for inputs x (tokens, d) float32 into y; returns the
        activations (tokens, len(slots)) float32 on the host (None without ``activations``)."""
        acts = np.empty((x.shape[0], len(slots)), dtype=np.float32) if activations else None
        if len(slots) == 0:
            return acts
        gate_b = None if self.b_gate[layer] is None else self.b_gate[layer][cache.position_of]
        up_b = None if self.b_up[layer] is None else self.b_up[layer][cache.position_of]
        if self.gpu is None:
            part = self.kernel.sparse_ffn(np.ascontiguousarray(x.numpy()), cache.slots, slots, self.kind,
                                          storage=self.storage, gate_bias=gate_b, up_bias=up_b, activations_out=acts)
            y += torch.from_numpy(part)
            return acts
        from sparseflash.runtime.gpu import as_device_array

        self.gpu.before_compute(layer)  # the layer's uploads so far land before the kernel reads its slots
        out = torch.empty(y.shape, dtype=torch.float32, device=y.device)
        self.kernel.sparse_ffn(as_device_array(x), self.gpu.slots[layer], slots, self.kind, storage=self.storage,
                               gate_bias=gate_b, up_bias=up_b,
                               out=as_device_array(out) if out.is_cuda else out.numpy(), activations_out=acts,
                               stream=self.gpu.compute_stream)
        self.gpu.after_compute(layer)
        y += out
        return acts


def count_active(activations: np.ndarray, down_norm: np.ndarray, threshold: float) -> int:
    """Neurons (columns) active for any token (row) of ``activations``, given their down-column norms."""
    return int(active_mask(neuron_magnitude(activations, down_norm[None, :]), threshold).any(axis=0).sum())
