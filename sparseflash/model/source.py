"""Lazy checkpoint access: one interface over HF safetensors folders and GGUF files.

Opening a ``CheckpointSource`` reads the config, the tokenizer and the tensor headers, and checks
that every tensor the config needs is there with its shape; no weight is read. A layer's tensors
are read when ``layer(i)`` asks for them (memory-mapped files, tensor by tensor, in their stored
dtype), widened to the compute dtype, checked for non-finite values and handed to the caller, who
drops them when the layer is done. Peak memory is therefore one layer in the compute dtype, not
the model. ``materialize`` still builds the whole ModelWeights for small models and tests.

Canonical tensor names are those of ``ModelWeights.named()``: ``embed``, ``lm_head``,
``final_norm_w``, ``final_norm_b`` and ``layers.{i}.{field}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from sparseflash.errors import CheckpointError
from sparseflash.model.config import ModelConfig
from sparseflash.model.weights import LayerWeights, ModelWeights, canonical_shapes


class StoredTensor(NamedTuple):
    """One tensor as the file stores it (read from the header only)."""

    name: str  # its name in the file
    type_name: str  # F32, F16, BF16, Q4_K, ...
    shape: tuple[int, ...]  # torch order
    nbytes: int  # bytes in the file


class CheckpointSource:
    """A checkpoint whose tensors are read on request. Subclasses fill ``path``, ``config``,
    ``tensors`` (canonical name -> StoredTensor), ``file_tensors`` (every tensor in the file) and implement ``_read``, ``_read_rows``,
    ``tokenizer``, ``content_hash`` and ``close``; then call ``_check_tensors``."""

    path: Path
    config: ModelConfig
    tensors: dict[str, StoredTensor]
    file_tensors: list[StoredTensor]

    # -- what a format implements ------------------------------------------------------------------

    def _read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (canonical), in its stored dtype or float32."""
        raise NotImplementedError

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a matrix (canonical name), in its stored dtype or float32."""
        raise NotImplementedError

    def tokenizer(self):
        """The checkpoint's TextTokenizer."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """sha256 of the checkpoint's files (16 hex chars): what artefacts record as their source."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles and maps; the source is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- validation --------------------------------------------------------------------------------

    def _check_tensors(self) -> None:
        """Every tensor the config needs is present with its shape; nothing is there that must not be."""
        c = self.config
        layer, layer_required, top, top_required = canonical_shapes(c)
        for field in top_required:
            self._check_one(field, top[field], required=True)
        for field in set(top) - top_required:
            self._check_one(field, top[field], required=False)
        for i in range(c.num_layers):
            for field, shape in layer.items():
                self._check_one(f"layers.{i}.{field}", shape, required=field in layer_required)
            if not c.gated and f"layers.{i}.w_gate" in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {self.tensors[f'layers.{i}.w_gate'].name!r} is a "
                                      f"gate projection, but the config's {c.arch} FFN is not gated")

    def _check_one(self, name: str, shape: tuple[int, ...], required: bool) -> None:
        t = self.tensors.get(name)
        if t is None:
            if required:
                raise CheckpointError(f"{self.path}: tensor {self.stored_name(name)!r} is missing")
            return
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {t.name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")

    def _check_layer_count(self, found: int) -> None:
        """``found`` = 1 + the highest layer index among the file's tensors."""
        if found > self.config.num_layers:
            extra = self._expected_name(f"layers.{self.config.num_layers}.w_up")
            raise CheckpointError(f"{self.path}: has {found} layers of tensors but config says "
                                  f"{self.config.num_layers} ({extra} and later layers are not in the config)")

    def stored_name(self, name: str) -> str:
        """The file's name for canonical ``name`` (for messages); the canonical name if absent."""
        t = self.tensors.get(name)
        return t.name if t is not None else self._expected_name(name)

    def _expected_name(self, name: str) -> str:
        return name

    # -- reading -----------------------------------------------------------------------------------

    def _finite(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.path}: tensor {self.stored_name(name)!r} has {bad} non-finite values "
                                  f"(NaN/inf); the checkpoint is corrupt")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor ``name`` (canonical) in ``dtype`` (None: as stored), checked for non-finite values."""
        t = self._finite(name, self._read(name))
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of matrix ``name`` (embedding or head slices), checked and converted."""
        t = self._finite(name, self._read_rows(name, start, stop))
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def layer(self, i: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
        """Layer ``i``'s weights in ``dtype``: read now, owned by the caller."""
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} of {self.config.num_layers}")
        fields = {}
        for field in LayerWeights.__dataclass_fields__:
            name = f"layers.{i}.{field}"
            fields[field] = self.tensor(name, dtype).contiguous() if name in self.tensors else None
        return LayerWeights(**fields)

    @property
    def tied(self) -> bool:
        """The output head is the embedding matrix."""
        return self.config.tie_word_embeddings

    @property
    def head_name(self) -> str:
        return "embed" if self.tied else "lm_head"

    def final_norm(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.tensor("final_norm_b", dtype) if self.has("final_norm_b") else None
        return self.tensor("final_norm_w", dtype), b

    def materialize(self, dtype: torch.dtype = torch.float32) -> ModelWeights:
        """Every tensor in ``dtype``: the whole model in memory (small models, tests, exports)."""
        embed = self.tensor("embed", dtype).contiguous()
        head = embed if self.tied else self.tensor("lm_head", dtype).contiguous()
        norm_w, norm_b = self.final_norm(dtype)
        return ModelWeights(embed, [self.layer(i, dtype) for i in range(self.config.num_layers)], norm_w, norm_b,
                            head)

    def lazy_weights(self, dtype: torch.dtype = torch.float32, keep_all: bool = False) -> ModelWeights:
        """ModelWeights whose layers are read on access (LazyLayers); embedding and head in ``dtype``.

        With ``keep_all`` every layer stays once read (a model that fits), else only the last one.
        """
        embed = self.tensor("embed", dtype).contiguous()
        head = embed if self.tied else self.tensor("lm_head", dtype).contiguous()
        norm_w, norm_b = self.final_norm(dtype)
        return ModelWeights(embed, LazyLayers(self, dtype, keep_all), norm_w, norm_b, head)

    # -- sizes -------------------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes of every tensor as stored (what the checkpoint occupies on disk, headers aside)."""
        return sum(t.nbytes for t in self.tensors.values())

    def numel(self, name: str) -> int:
        n = 1
        for s in self.tensors[name].shape:
            n *= s
        return n

    def layer_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the largest layer in ``dtype`` (what ``layer(i, dtype)`` allocates)."""
        size = torch.empty((), dtype=dtype).element_size()
        per = [sum(self.numel(k) for k in self.tensors if k.startswith(f"layers.{i}.")) for i in
               range(self.config.num_layers)]
        return max(per, default=0) * size

    def stored_layer_bytes(self) -> int:
        """Bytes of the largest layer as stored (what reading it pulls from the file)."""
        return max((sum(t.nbytes for k, t in self.tensors.items() if k.startswith(f"layers.{i}."))
                    for i in range(self.config.num_layers)), default=0)

    def parameter_count(self) -> int:
        """Values in the model (a tied head counted once)."""
        return sum(self.numel(k) for k in self.tensors if not (k == "lm_head" and self.tied))

    def tensor_list(self) -> list[dict]:
        """Every tensor the file stores (weights or not): name, type and shape, from headers only."""
        return [{"name": t.name, "type": t.type_name, "shape": list(t.shape)} for t in self.file_tensors]


class LazyLayers(Sequence):
    """``source``'s layers as a sequence: ``layers[i]`` reads layer i in ``dtype`` on first access.

    Only the most recently read layer is kept unless ``keep_all``, so a forward pass over a model
    larger than memory holds one layer at a time (the attention and the FFN of a layer share it).
    """

    def __init__(self, source: CheckpointSource, dtype: torch.dtype = torch.float32, keep_all: bool = False):
        self.source, self.dtype, self.keep_all = source, dtype, keep_all
        self._kept: dict[int, LayerWeights] = {}

    def __len__(self) -> int:
        return self.source.config.num_layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i not in self._kept:
            if not self.keep_all:
                self._kept.clear()  # drop the previous layer before reading the next
            self._kept[i] = self.source.layer(i, self.dtype)
        return self._kept[i]

    def __iter__(self) -> Iterator[LayerWeights]:
        for i in range(len(self)):
            yield self[i]


def open_source(path: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> CheckpointSource:
    """Open a checkpoint folder or .gguf file lazily (None: the bundled model).

    ``tokenizer`` (a tokenizer.json) replaces the checkpoint's own tokenizer.
    """
    override = None
    if tokenizer is not None:
        from sparseflash.model.tokenizer import TextTokenizer

        override = TextTokenizer.from_file(tokenizer)
    if path is not None and str(path).endswith(".gguf"):
        from sparseflash.model.gguf_source import GGUFSource

        source = GGUFSource(path, tokenizer_json=override.to_json() if override else None)
    else:
        from sparseflash.model.checkpoint import default_model_dir
        from sparseflash.model.safetensors_source import SafetensorsSource

        source = SafetensorsSource(path if path is not None else default_model_dir())
    if override is not None:
        if override.vocab_size > source.config.vocab_size:
            source.close()
            raise CheckpointError(f"{tokenizer}: the tokenizer has {override.vocab_size} tokens but the model's "
                                  f"embedding only {source.config.vocab_size}")
        source.tokenizer = lambda: override
    return source
