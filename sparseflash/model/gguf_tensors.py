"""Per-tensor access to a .gguf file: list tensors without reading data, dequantize one on request.

``GGUFTensors`` sits on gguf.GGUFReader's memory map. Listing costs nothing but the header; each
``load(name)`` reads that tensor's bytes only and returns it as float32 torch, dequantized by
gguf-py (``gguf.quants.dequantize``: every type it implements, F32/F16/BF16 and the Q*/K/IQ/TQ
quantizations). A checkpoint loader can therefore hold one tensor (or one layer) at a time.

Checks, each a one-line error that names the tensor and its GGML type:
- structure (``check_gguf_file``): a row length that is not a whole number of blocks, data that
  extends past the end of the file (truncated blocks), overlapping tensors;
- block count: the data region a tensor owns (up to the next tensor, less alignment padding) must
  hold exactly blocks x type size bytes for the declared shape; more means the shape is wrong;
- type: one gguf-py cannot dequantize is an UnsupportedModelError;
- values: a non-finite result (NaN/inf block scales) is a CheckpointError.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.gguf_format import GGUFFormatError, check_gguf_file


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as declared in the header; nothing of its data has been read."""

    name: str
    type_name: str  # GGML type: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for a matrix
    nbytes: int  # stored bytes = blocks x type size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@functools.cache
def dequantizable_types() -> frozenset[str]:
    """GGML type names the installed gguf-py can turn into float32 (probed once on one zero block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    ok = set()
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        try:
            with np.errstate(all="ignore"):
                dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            continue
        ok.add(qtype.name)
    return frozenset(ok)


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        # check_gguf_file has already passed, so this is a case it does not model
        raise GGUFFormatError(f"{path}: cannot parse GGUF file ({type(e).__name__}: {str(e)[:200]})") from None


class GGUFTensors:
    """The tensors of one .gguf file, by name; ``load`` dequantizes one to float32 torch.

    The header is checked first (``check_gguf_file``), so a malformed file fails before any
    parsing. ``reader`` gives the key/value metadata (gguf.GGUFReader.fields).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        layout = check_gguf_file(self.path)
        self.reader = _open_reader(self.path)
        self._raw = {t.name: t for t in self.reader.tensors}
        self._infos: dict[str, GGUFTensorInfo] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne[0] first
            self._infos[t.name] = GGUFTensorInfo(t.name, t.tensor_type.name, shape, int(t.n_bytes))
        self._check_block_counts(layout)

    def _check_block_counts(self, layout) -> None:
        """Each tensor's data region (to the next tensor's start) holds exactly its declared blocks."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        ordered = sorted(layout.tensors, key=lambda e: e.start)
        for e, nxt in zip(ordered, ordered[1:]):
            info = self._infos[e.name]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(e.ggml_type)]
            blocks = info.numel // block
            if blocks * type_size != info.nbytes or info.nbytes != e.nbytes:
                raise CheckpointError(f"{self.path}: tensor {e.name!r} ({info.type_name}): {info.nbytes} bytes "
                                      f"for {blocks} blocks of {type_size} bytes")
            region = nxt.start - e.start
            padded = -(-e.nbytes // layout.alignment) * layout.alignment
            if region > padded:
                held = region // type_size
                raise CheckpointError(
                    f"{self.path}: tensor {e.name!r} ({info.type_name}, shape {list(info.shape)}) declares "
                    f"{blocks} blocks ({e.nbytes} bytes) but its data region holds {region} bytes (about {held} "
                    f"blocks); the block count (shape) is wrong")

    # --- listing -------------------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __iter__(self):
        return iter(self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> GGUFTensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self._infos[name]

    def type_counts(self) -> dict[str, int]:
        """GGML type name -> number of tensors of that type, most common first."""
        return dict(Counter(i.type_name for i in self._infos.values()).most_common())

    def check_types(self, names=None) -> None:
        """UnsupportedModelError naming the first tensor (of ``names``, default all) gguf-py cannot read."""
        ok = dequantizable_types()
        bad = [self._infos[n] for n in (names if names is not None else self._infos) if self._infos[n].type_name not in ok]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UnsupportedModelError(
                f"{self.path}: tensor {bad[0].name!r} has GGML type {bad[0].type_name}{more}, which sparseflash "
                f"cannot dequantize (readable: {', '.join(sorted(ok))})")

    # --- data ----------------------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The stored array as gguf.GGUFReader maps it (bytes per row for quantized types); no copy."""
        self.info(name)
        return self._raw[name].data

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to a float32 torch tensor in torch order (a copy, not the map).

        Reads only this tensor's bytes. Raises UnsupportedModelError for a type gguf-py cannot
        dequantize and CheckpointError for a non-finite value.
        """
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.info(name)
        self.check_types([name])
        data = self._raw[name].data
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                values = dequantize(data, GGMLQuantizationType[info.type_name])
        except (ValueError, NotImplementedError) as e:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} ({info.type_name}) cannot be dequantized "
                                        f"({str(e)[:120]})") from None
        values = np.asarray(values, dtype=np.float32).reshape(info.shape)
        if not values.flags.writeable or np.may_share_memory(values, data):
            values = values.copy()  # F32 dequantizes to a view of the read-only map
        t = torch.from_numpy(values)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{self.path}: tensor {name!r} ({info.type_name}) has {bad} non-finite values "
                                  f"(NaN/inf weights or block scales); the file is corrupt")
        return t
