"""Where the layout writer takes weights from, one layer at a time, and where it parks them.

``LayoutWeights`` reads from an in-memory model (open_dense) or from a lazy checkpoint source: a
layer's weights when its resident tensors are declared, its FFN weights again when the writer
pulls its bundles, the embedding and output head in row blocks. ``ResidentStage`` holds the
resident tensors the writer reads only at write time (attention matrices, norms, embedding, head)
in temporary memory-mapped files in their storage dtype, so they are never all in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sparseflash.kernels import quantize
from sparseflash.layout import schema
from sparseflash.model.source import CheckpointSource
from sparseflash.model.weights import LayerWeights

QUANTIZED = ("q8", "q4")
ROW_BLOCK_BYTES = 16 << 20  # float32 bytes of embedding / head rows converted at a time


class LayoutWeights:
    """A model's weights for writing a layout: ``model`` is a DenseModel or a CheckpointSource."""

    def __init__(self, model):
        self.source = model if isinstance(model, CheckpointSource) else None
        self.model = None if self.source is not None else model
        self.config = model.config
        tokenizer = self.source.tokenizer() if self.source is not None else model.tokenizer
        self.tokenizer_json = tokenizer.to_json()

    @property
    def tied(self) -> bool:
        if self.source is not None:
            return self.source.tied
        return self.model.weights.lm_head is self.model.weights.embed

    def vector(self, name: str) -> torch.Tensor | None:
        """final_norm_w / final_norm_b (float32), None if absent."""
        if self.source is not None:
            return self.source.tensor(name) if self.source.has(name) else None
        return getattr(self.model.weights, name)

    def row_blocks(self, name: str) -> Iterator[torch.Tensor]:
        """embed / lm_head as float32 blocks of rows (a whole tensor for an in-memory model)."""
        if self.source is None:
            yield getattr(self.model.weights, name)
            return
        vocab, d = self.config.vocab_size, self.config.hidden_size
        rows = max(1, ROW_BLOCK_BYTES // (4 * d))
        stored = self.source.head_name if name == "lm_head" else name
        for start in range(0, vocab, rows):
            yield self.source.rows(stored, start, min(vocab, start + rows))

    def layer(self, i: int) -> LayerWeights:
        """Layer i's weights: from a source in their stored dtype (the writer converts them to the
        layout's storage, exactly as from float32)."""
        return self.source.layer(i, dtype=None) if self.source is not None else self.model.weights.layers[i]

    def ffn(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w_up, w_gate or None, w_down) of layer i; read again from a source (only these tensors,
        in their stored dtype: the writer widens a block of neurons at a time)."""
        if self.source is None:
            w = self.model.weights.layers[i]
            return w.w_up, w.w_gate, w.w_down
        gate = f"layers.{i}.w_gate"
        read = lambda name: self.source.tensor(name, dtype=None)  # noqa: E731
        return (read(f"layers.{i}.w_up"), read(gate) if self.source.has(gate) else None, read(f"layers.{i}.w_down"))


class ResidentStage:
    """Resident tensors in temporary .npy files next to the output (removed by ``close``)."""

    def __init__(self, out_path: str | os.PathLike):
        parent = Path(out_path).resolve().parent
        self.folder = Path(tempfile.mkdtemp(prefix=f".{Path(out_path).name}.resident-", dir=parent))
        self._count = 0

    def put(self, values: torch.Tensor, tag: str) -> np.ndarray:
        """``values`` in storage dtype ``tag``, parked in a file; the returned array maps it (a
        quantized tensor as its uint8 rows)."""
        return self.put_blocks([values], tuple(values.shape), tag)

    def put_blocks(self, blocks, shape: tuple[int, ...], tag: str) -> np.ndarray:
        """Row blocks (float tensors) of a (rows, ...) tensor, converted and written one at a time
        (q8/q4 quantize along the last axis, so a block of rows quantizes as the whole would)."""
        self._count += 1
        array = None
        row = 0
        for block in blocks:
            stored = quantize(block.float().numpy(), tag) if tag in QUANTIZED else schema.to_storage(block, tag)
            if array is None:
                array = np.lib.format.open_memmap(self.folder / f"{self._count}.npy", "w+", stored.dtype,
                                                  (shape[0], *stored.shape[1:]))
            array[row : row + len(stored)] = stored
            row += len(stored)
        array.flush()  # written back: the pages are clean, the kernel may drop them
        return array

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
