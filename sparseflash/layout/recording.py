"""Record (FFN input, active mask) pairs of every layer over a token stream, spilled to disk.

Per layer, ``x_L{l}.npy`` holds the FFN inputs (tokens, d) in float16 and ``mask_L{l}.npy`` the
bit-packed active masks (tokens, ceil(neurons/8)), both as .npy memmaps, so a layer is loaded alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparseflash.layout.activations import NeuronTap
from sparseflash.layout.masks import pack, packed_width, unpack
from sparseflash.model.loader import DenseModel


class Recording:
    """Per-layer FFN inputs and active masks of ``tokens`` tokens, stored under ``folder``."""

    def __init__(self, folder: str | os.PathLike, layers: int, tokens: int, d: int, neurons: int):
        self.folder = Path(folder)
        self.layers, self.tokens, self.d, self.neurons = layers, tokens, d, neurons

    def x(self, layer: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.folder / f"x_L{layer}.npy").astype(np.float32))

    def mask(self, layer: int) -> torch.Tensor:
        return torch.from_numpy(unpack(np.load(self.folder / f"mask_L{layer}.npy"), self.neurons))


def record(model: DenseModel, seqs: torch.Tensor, thresholds: list[float], folder: str | os.PathLike,
           batch: int = 8, desc: str = "recording", quiet: bool = False) -> Recording:
    """Run the dense model over windows ``seqs`` (windows, ctx) and store every layer's (x, mask)."""
    c = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = seqs.numel()
    xs = [np.lib.format.open_memmap(folder / f"x_L{l}.npy", "w+", np.float16, (tokens, c.hidden_size))
          for l in range(c.num_layers)]
    masks = [np.lib.format.open_memmap(folder / f"mask_L{l}.npy", "w+", np.uint8,
                                       (tokens, packed_width(c.intermediate_size))) for l in range(c.num_layers)]
    tap = NeuronTap(model.weights, thresholds)
    pos = [0]

    def hook(layer, x, a):
        rows = slice(pos[0], pos[0] + len(x))
        xs[layer][rows] = x.numpy().astype(np.float16)
        masks[layer][rows] = pack(tap.active(layer, a).numpy())
        return None

    net = tap.transformer(c, hook)
    bar = tqdm(total=tokens, desc=desc, unit="tok", disable=quiet, leave=False)
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        net(chunk)
        pos[0] += chunk.numel()
        bar.update(chunk.numel())
    bar.close()
    for arr in xs + masks:
        arr.flush()
    xs.clear()
    masks.clear()
    return Recording(folder, c.num_layers, tokens, c.hidden_size, c.intermediate_size)
