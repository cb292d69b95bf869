"""A .gguf file (nemotron, arcee, llama) opened lazily: the CheckpointSource of GGUF.

Built on ``GGUFTensors`` (the per-tensor accessor over gguf-py's memory map): opening reads the
header, metadata and tokenizer and checks the tensors; ``layer(i)`` dequantizes that layer's tensors
only (any type gguf-py implements) and converts them from llama.cpp's conventions to sparseflash's
(gguf_mapping.from_gguf_tensor). Embedding rows are dequantized row by row on request.

A llama.cpp nemotron file always carries ``output.weight``, so a tied model is written with a copy
of the embedding; an output head that equals the embedding (same type and bytes, or same values)
is read back as tied.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import UnsupportedModelError
from sparseflash.model.gguf_mapping import (
    GGUF_LAYER_NAMES,
    GGUF_TOP_NAMES,
    ROPE_FREQS,
    from_gguf_tensor,
    gguf_arch,
)
from sparseflash.model.gguf_tensors import GGUFTensors
from sparseflash.model.source import CheckpointSource, StoredTensor

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_GGUF_FIELD = {g: f for f, g in GGUF_LAYER_NAMES.items()}
_GGUF_TOP = {g: f for f, g in GGUF_TOP_NAMES.items()}


def _same_bytes(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Equal arrays, compared a block of rows at a time (no whole-matrix temporaries)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(np.array_equal(a[i : i + rows], b[i : i + rows]) for i in range(0, len(a), rows))


class GGUFSource(CheckpointSource):
    """A .gguf file; see the module docstring. ``tokenizer_json`` replaces the file's tokenizer
    (which is then not read)."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike, tokenizer_json: str | None = None):
        from sparseflash.model.gguf_import import (
            _check_config,
            _check_rope_freqs,
            _config,
            _Metadata,
            _tokenizer_json,
        )

        self.path = Path(path)
        self.gguf = GGUFTensors(self.path)
        meta = _Metadata(self.gguf.reader.fields, self.path)
        arch_name = meta.str("general.architecture")
        self.arch = gguf_arch(arch_name)
        config = _config(meta, arch_name, self.arch, self.gguf)
        _check_config(config, self.path)
        if tokenizer_json is None:  # before the weights: an unknown tokenizer fails fast
            tokenizer_json, self.tokenizer_rebuilt = _tokenizer_json(meta)
        else:
            self.tokenizer_rebuilt = False
        self.tokenizer_json = tokenizer_json
        self._fields: dict[str, str] = {}  # canonical name -> GGUF name
        unknown, layers_found = [], 0
        for name in self.gguf.names():
            if name == ROPE_FREQS:
                continue
            m = _LAYER.fullmatch(name)
            if m:
                layers_found = max(layers_found, int(m.group(1)) + 1)
                field = _GGUF_FIELD.get(m.group(2))
                ok = field in self.arch.layer_fields
                canonical = f"layers.{m.group(1)}.{field}"
            else:
                field = _GGUF_TOP.get(name)
                ok = field is not None and not (field == "final_norm_b" and self.arch.norm != "layernorm1p")
                canonical = field
            if ok:
                self._fields[canonical] = name
            else:
                unknown.append(name)
        self.config = config
        self._check_layer_count(layers_found)
        if unknown:
            raise UnsupportedModelError(f"{self.path}: tensors llama.cpp's {config.arch} architecture does not have: "
                                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        self.gguf.check_types(list(self._fields.values()))  # an unreadable type fails before any data is read
        self.config = dataclasses.replace(config, tie_word_embeddings=self._head_is_embedding())
        if self.config.tie_word_embeddings:
            self._fields.pop("lm_head", None)
        self.file_tensors = [StoredTensor(i.name, i.type_name, i.shape, i.nbytes) for i in self.gguf]
        self.tensors = {}
        for canonical, name in self._fields.items():
            info = self.gguf.info(name)
            self.tensors[canonical] = StoredTensor(name, info.type_name, info.shape, info.nbytes)
        self._check_tensors()
        if ROPE_FREQS in self.gguf:
            _check_rope_freqs(self.gguf.load(ROPE_FREQS), self.config, self.path)

    def _head_is_embedding(self) -> bool:
        head, embed = self._fields.get("lm_head"), self._fields.get("embed")
        if head is None or embed is None:
            return True
        a, b = self.gguf.info(head), self.gguf.info(embed)
        if a.shape != b.shape:
            return False
        if a.type_name == b.type_name:
            return _same_bytes(self.gguf.raw(head), self.gguf.raw(embed))
        return torch.equal(self.gguf.load(head), self.gguf.load(embed))

    def _expected_name(self, name: str) -> str:
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
        if m:
            return f"blk.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
        return GGUF_TOP_NAMES.get(name, name)

    def _field(self, name: str) -> str:
        return name.rsplit(".", 1)[-1] if name.startswith("layers.") else name

    def _read(self, name: str) -> torch.Tensor:
        return from_gguf_tensor(self.arch, self.config, self._field(name), self.gguf.load(self._fields[name]))

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.gguf.info(self._fields[name])
        raw = self.gguf.raw(self._fields[name])[start:stop]
        with np.errstate(over="ignore", invalid="ignore"):
            values = dequantize(raw, GGMLQuantizationType[info.type_name])
        values = np.array(values, dtype=np.float32).reshape(stop - start, *info.shape[1:])
        return from_gguf_tensor(self.arch, self.config, self._field(name), torch.from_numpy(values))

    def tokenizer(self):
        from sparseflash.model.tokenizer import TextTokenizer

        return TextTokenizer.from_json(self.tokenizer_json, f"{self.path} tokenizer")

    def content_hash(self) -> str:
        from sparseflash.model.checkpoint import file_hash

        return file_hash(self.path)

    def close(self) -> None:
        self.gguf = None
