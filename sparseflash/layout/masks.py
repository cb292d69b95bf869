"""Active-set masks on disk: rows of bit-packed neuron masks (one row per token), zstd-compressed.

A mask file holds ``tokens`` rows of ``ceil(neurons / 8)`` bytes (``np.packbits(bitorder="little")``:
neuron i is bit i % 8 of byte i // 8), concatenated in token order and compressed as one zstd stream.
Shapes live in the profile's JSON, not in the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import zstandard

from sparseflash.errors import ArtefactError


def count_true(mask, dim: int | None = None):
    """Number of True entries of a bool mask (torch or numpy, on the host): over ``dim`` (an int64
    torch tensor) or all of it (an int). Torch widens a bool tensor to a full int64 or float copy to
    sum it (8x the mask: 173 MiB for 22k tokens x 1,024 neurons); numpy sums bools in small chunks."""
    a = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if dim is None:
        return int(np.count_nonzero(a))
    return torch.from_numpy(np.asarray(a.sum(axis=dim), dtype=np.int64))


def packed_width(neurons: int) -> int:
    return (neurons + 7) // 8


def pack(mask: np.ndarray) -> np.ndarray:
    """(tokens, neurons) bool -> (tokens, ceil(neurons/8)) uint8."""
    return np.packbits(mask, axis=1, bitorder="little")


def unpack(packed: np.ndarray, neurons: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=neurons, bitorder="little").astype(bool)


class MaskWriter:
    """Append packed mask rows to a zstd stream; ``close()`` finishes the frame."""

    def __init__(self, path: str | os.PathLike, neurons: int, level: int = 3):
        self.path = os.fspath(path)
        self.width = packed_width(neurons)
        self.rows = 0
        self._file = open(self.path, "wb")
        self._stream = zstandard.ZstdCompressor(level=level).stream_writer(self._file)

    def write(self, packed: np.ndarray) -> None:
        if packed.ndim != 2 or packed.shape[1] != self.width:
            raise ValueError(f"mask rows of width {packed.shape} do not match {self.width} bytes")
        self._stream.write(np.ascontiguousarray(packed, dtype=np.uint8).tobytes())
        self.rows += len(packed)

    def close(self) -> None:
        self._stream.flush(zstandard.FLUSH_FRAME)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._stream.close()


def read_masks(path: str | os.PathLike, neurons: int, tokens: int, rows_per_chunk: int = 8192) -> Iterator[np.ndarray]:
    """Yield packed rows in chunks from a mask file; checks the row count and width."""
    width = packed_width(neurons)
    got = 0
    try:
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            want = rows_per_chunk * width
            while True:
                raw = b""
                while len(raw) < want:  # stream reads may return less than asked
                    more = reader.read(want - len(raw))
                    if not more:
                        break
                    raw += more
                if not raw:
                    break
                if len(raw) % width:
                    raise ArtefactError(f"{path}: mask data ends inside a row")
                chunk = np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)
                got += len(chunk)
                yield chunk
    except FileNotFoundError:
        raise ArtefactError(f"{path}: mask file not found; re-run `sparseflash profile`") from None
    except zstandard.ZstdError as e:
        raise ArtefactError(f"{path}: corrupt mask file ({e})") from None
    if got != tokens:
        raise ArtefactError(f"{path}: holds {got} mask rows, expected {tokens}")


def load_masks(path: str | os.PathLike, neurons: int, tokens: int) -> np.ndarray:
    """All packed rows (tokens, ceil(neurons/8)) of a mask file."""
    chunks = list(read_masks(path, neurons, tokens))
    return np.concatenate(chunks) if chunks else np.zeros((0, packed_width(neurons)), dtype=np.uint8)
