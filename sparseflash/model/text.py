"""Read evaluation and calibration text: plain UTF-8 or zstd-compressed (.zst)."""

from __future__ import annotations

import os

from sparseflash.errors import SparseflashError


def read_text(path: str | os.PathLike) -> str:
    """The whole text of ``path``; ``.zst`` files are decompressed in a stream."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if path.endswith(".zst"):
                import zstandard

                raw = zstandard.ZstdDecompressor().stream_reader(f).read()
            else:
                raw = f.read()
    except FileNotFoundError:
        raise SparseflashError(f"{path}: text file not found") from None
    except IsADirectoryError:
        raise SparseflashError(f"{path}: is a directory, expected a text file") from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise SparseflashError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SparseflashError(f"{path}: not UTF-8 text (byte {e.start})") from None
