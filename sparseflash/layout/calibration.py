"""Layer-by-layer passes over a checkpoint: how the preparation stages see activations.

A pass embeds its *streams* (sets of token windows: calibration, threshold sample, held-out, ...),
then, for each layer: reads the layer's weights from the lazy source, runs the streams through it,
each with an FFN hook that takes from the layer what the stage needs (activations, active masks,
FFN inputs) or changes the activations (masking), lets the stage finish the layer (a threshold
search, statistics, a predictor), and drops the weights before the next layer is read.

    one layer (as stored, one tensor widened) + every stream's hidden states + one batch's activations  = peak

Hidden states are float32 (the same numbers as the in-memory forward): in memory, or in a
temporary memory-mapped file once a stream's states exceed ``spill_bytes`` (see docs/prepare.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.model.layerwise import HiddenStates, LayerHook, LayerwiseModel, WidenedLayer
from sparseflash.model.source import CheckpointSource
from sparseflash.model.weights import LayerWeights


class LayerPass:
    """One pass over the layers for named streams of windows (name -> (windows, ctx) token ids).

    ``layers()`` yields (index, weights) with the streams' hidden states at that layer's input;
    ``run(name, ...)`` moves one stream through the current layer; ``nll(name)`` scores a stream
    at the end. Progress counts tokens moved through layers.
    """

    def __init__(self, source: CheckpointSource, streams: dict[str, torch.Tensor], batch: int = 8,
                 desc: str = "layer pass", quiet: bool = False, spill_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None):
        self.source = source
        self.model = LayerwiseModel(source, batch, spill_bytes, spill_dir)
        self.seqs = dict(streams)
        self.states: dict[str, HiddenStates] = {}
        layers = source.config.num_layers
        self.bar = tqdm(total=layers * sum(s.numel() for s in streams.values()), desc=desc, unit="tok",
                        unit_scale=True, disable=quiet, leave=False, dynamic_ncols=True)
        try:
            for name, seqs in self.seqs.items():
                self.states[name] = self.model.embed(seqs)
        except BaseException:
            self.close()
            raise
        self.layer_index = -1

    def layers(self) -> Iterator[tuple[int, WidenedLayer]]:
        """Each layer's weights in turn (read now, held as stored, widened to float32 field by field
        as they are used; dropped before the next layer is read)."""
        for i in range(self.source.config.num_layers):
            self.layer_index = i
            self.bar.set_postfix_str(f"layer {i + 1}/{self.source.config.num_layers}", refresh=False)
            w = WidenedLayer(self.source.layer(i, dtype=None))
            yield i, w
            del w

    def run(self, name: str, layer: int, w: LayerWeights, hook: LayerHook | None = None, window_ids=None) -> None:
        """Stream ``name`` (or its windows ``window_ids``) through ``layer``; ``hook`` sees each batch."""
        self.model.run_layer(layer, w, self.states[name], hook, window_ids, progress=self.bar.update)

    def nll(self, name: str) -> tuple[float, int]:
        """(summed next-token NLL, predicted tokens) of stream ``name`` after the last layer."""
        return self.model.nll(self.states[name], self.seqs[name])

    def nll_windows(self, name: str) -> np.ndarray:
        """Each window's summed next-token NLL of stream ``name`` after the last layer."""
        return self.model.nll_windows(self.states[name], self.seqs[name])

    def copy_windows(self, name: str, source: str, window_ids: np.ndarray, at: int) -> None:
        """Windows ``window_ids`` of stream ``source`` into stream ``name``'s windows from ``at`` on
        (a branch: the copies go on from the layer ``source`` is at)."""
        dst = self.states[name]
        dst.array[at : at + len(window_ids)] = self.states[source].array[np.asarray(window_ids)]
        dst.flush()

    def close(self) -> None:
        self.bar.close()
        for states in self.states.values():
            states.close()
        self.states = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
