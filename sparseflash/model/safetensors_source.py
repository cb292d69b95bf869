"""A Hugging Face checkpoint folder (config.json, safetensors shards, tokenizer.json), opened lazily.

Each shard is opened with safetensors' ``safe_open``, which memory-maps it; only the headers are
read at open. A tensor is read (in its stored dtype: F32, F16 or BF16) when a layer asks for it.

Checks at open, each a one-line CheckpointError naming the file or tensor, as llama.cpp makes them:
a shard listed in the index that is missing or lacks a tensor the index places there; a tensor of a
layer beyond the config's ``num_hidden_layers``; a required tensor missing or of the wrong shape;
an unsupported dtype. Non-finite values are refused when the layer holding them is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.checkpoint import (
    HF_LAYER_NAMES,
    HF_TOP_NAMES,
    SAFETENSORS_INDEX,
    _read_json,
    checkpoint_hash,
    shard_files,
)
from sparseflash.model.config import config_from_hf
from sparseflash.model.source import CheckpointSource, StoredTensor

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_FIELD = {hf: field for field, hf in HF_LAYER_NAMES.items()}
_HF_TOP = {hf: field for field, hf in HF_TOP_NAMES.items()}


def _header_error(path: Path, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return CheckpointError(f"{path}: cannot read safetensors file ({msg}); is it truncated or corrupt?")


class SafetensorsSource(CheckpointSource):
    """A checkpoint folder; see the module docstring."""

    kind = "safetensors"

    def __init__(self, folder: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such checkpoint folder")
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder (expected config.json, safetensors, "
                                  f"tokenizer.json)")
        self.path = folder
        self.config = config_from_hf(_read_json(folder / "config.json", "config.json"))
        self.tokenizer_path = folder / "tokenizer.json"
        if not self.tokenizer_path.exists():
            raise CheckpointError(f"{folder}: tokenizer.json not found (sparseflash needs the HF fast-tokenizer file)")
        placed = self._index_placement(folder)
        self._handles, self._where = [], {}  # shard handles; canonical name -> (handle index, file name)
        self.tensors: dict[str, StoredTensor] = {}
        self.file_tensors: list[StoredTensor] = []
        layers_found = 0
        for shard in shard_files(folder):
            if not shard.exists():
                raise CheckpointError(f"{shard}: safetensors shard listed in {SAFETENSORS_INDEX} is missing")
            try:
                handle = safe_open(str(shard), framework="pt")
                names = list(handle.keys())
                slices = {name: handle.get_slice(name) for name in names}
                infos = {name: (s.get_dtype(), tuple(int(x) for x in s.get_shape())) for name, s in slices.items()}
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise _header_error(shard, e) from None
            self._handles.append(handle)
            for name, (dtype, shape) in infos.items():
                placed.pop(name, None)
                numel = 1
                for s in shape:
                    numel *= s
                stored = StoredTensor(name, dtype, shape, numel * _DTYPE_BYTES.get(dtype, 0))
                self.file_tensors.append(stored)
                canonical, layer = self._canonical(name)
                if layer is not None:
                    layers_found = max(layers_found, layer + 1)
                if canonical is None:
                    continue  # e.g. rotary inv_freq buffers of older checkpoints: not weights
                self.tensors[canonical] = stored
                self._where[canonical] = (len(self._handles) - 1, name)
        if placed:
            name, shard = next(iter(placed.items()))
            raise CheckpointError(f"{folder / shard}: lacks tensor {name!r}, which {SAFETENSORS_INDEX} places there")
        self._check_layer_count(layers_found)
        if self.config.tie_word_embeddings:
            self.tensors.pop("lm_head", None)
            self._where.pop("lm_head", None)
        self._check_tensors()
        for t in self.tensors.values():
            if t.type_name not in _DTYPE_BYTES:
                raise UnsupportedModelError(f"{folder}: tensor {t.name!r} has dtype {t.type_name} "
                                            f"(supported: F32, F16, BF16)")

    @staticmethod
    def _index_placement(folder: Path) -> dict[str, str]:
        """Tensor name -> shard file as the index lists them (empty without an index)."""
        index = folder / SAFETENSORS_INDEX
        if not index.exists():
            return {}
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        return dict(weight_map) if isinstance(weight_map, dict) else {}

    @staticmethod
    def _canonical(name: str) -> tuple[str | None, int | None]:
        """(canonical name or None, layer index or None) of a HF tensor name."""
        m = _LAYER_NAME.fullmatch(name)
        if m:
            field = _HF_FIELD.get(m.group(2))
            return (f"layers.{m.group(1)}.{field}" if field else None), int(m.group(1))
        return _HF_TOP.get(name), None

    def _expected_name(self, name: str) -> str:
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
        if m:
            return f"model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}"
        return HF_TOP_NAMES.get(name, name)

    def _handle(self, name: str):
        if not self._handles:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        i, stored = self._where[name]
        return self._handles[i], stored

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        handle, stored = self._handle(name)
        try:
            return handle.get_tensor(stored)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _header_error(self.path, e) from None

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        handle, stored = self._handle(name)
        return handle.get_slice(stored)[start:stop]

    def tokenizer(self):
        from sparseflash.model.tokenizer import TextTokenizer

        return TextTokenizer.from_file(self.tokenizer_path)

    def content_hash(self) -> str:
        return checkpoint_hash(self.path)

    def close(self) -> None:
        self._handles = []
