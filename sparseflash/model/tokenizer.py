"""Tokenizer: the Hugging Face fast-tokenizer file (tokenizer.json) through the tokenizers package."""

from __future__ import annotations

import os

from sparseflash.errors import CheckpointError


class TextTokenizer:
    """Encode text to ids and back; special tokens follow the tokenizer's own post-processor."""

    def __init__(self, tok, source: str):
        self._tok = tok
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TextTokenizer:
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read(), str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: tokenizer.json not found") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: tokenizer.json is not UTF-8 text") from None

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer.json") -> TextTokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text), source)
        except Exception as e:  # the tokenizers package raises plain Exception on bad files
            raise CheckpointError(f"{source}: cannot parse tokenizer ({str(e).splitlines()[0][:200]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer.json text (to embed in a layout file)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
