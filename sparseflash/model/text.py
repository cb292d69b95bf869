"""Read evaluation and calibration text: plain UTF-8 or zstd-compressed (.zst)."""

from __future__ import annotations

import os

from sparseflash.errors import SparseflashError
from sparseflash.paths import input_file


def read_text(path: str | os.PathLike) -> str:
    """The whole text of ``path``; ``.zst`` files are decompressed in a stream. Anything but a regular
    file (a FIFO would block, a device never ends) is refused before it is opened."""
    path = os.fspath(path)
    input_file(path, "text file")
    try:
        with open(path, "rb") as f:
            if path.endswith(".zst"):
                import zstandard

                raw = zstandard.ZstdDecompressor().stream_reader(f).read()
            else:
                raw = f.read()
    except FileNotFoundError:
        raise SparseflashError(f"{path}: text file not found") from None
    except OSError as e:
        raise SparseflashError(f"{path}: cannot read the text file ({e.strerror or e})") from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise SparseflashError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SparseflashError(f"{path}: not UTF-8 text (byte {e.start})") from None


def split_corpus(path: str | os.PathLike, tokenizer, first: int, second: int,
                 second_path: str | os.PathLike | None = None) -> tuple[list[int], list[int]]:
    """Two disjoint token runs: ``first`` tokens of ``path`` and ``second`` tokens after them, or the
    first ``second`` tokens of ``second_path`` when given (held-out text of its own). Refuses a text
    too short to give ``first`` tokens."""
    if second_path is not None:
        a, b = corpus_ids(path, tokenizer, first)[:first], corpus_ids(second_path, tokenizer, second)[:second]
    else:
        ids = corpus_ids(path, tokenizer, first + second)
        a, b = ids[:first], ids[first : first + second]
    if len(a) < first:
        raise SparseflashError(f"{path}: has {len(a)} tokens, fewer than the {first} asked for")
    return a, b


def corpus_ids(path: str | os.PathLike, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of a text file, at least ``max_tokens`` of them when the text has that many.

    Only a prefix of a large file is tokenised: the prefix grows until it yields enough tokens.
    """
    text = read_text(path)
    if max_tokens is None:
        return tokenizer.encode(text)
    chars = max(4096, max_tokens * 6)
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > max_tokens or chars >= len(text):
            return ids
        chars *= 2
