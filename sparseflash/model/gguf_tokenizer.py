"""Tokenizer in GGUF: the HF tokenizer.json as llama.cpp's ``tokenizer.ggml.*`` vocabulary and back.

Export writes both the original tokenizer.json (the standard ``tokenizer.huggingface.json`` key,
which sparseflash reads back verbatim) and the ``gpt2`` (byte-level BPE) vocabulary that
llama.cpp needs: tokens, token types, merges, pre-tokenizer name, special token ids.
Import of a GGUF without the JSON rebuilds a byte-level BPE tokenizer from that vocabulary.
Only byte-level BPE tokenizers (GPT-2 and Llama-3 pre-tokenization) can go either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sparseflash.errors import CheckpointError, UnsupportedModelError

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# the Llama-3 pre-tokenizer split, as in Meta's tokenizer.json and llama.cpp's "llama-bpe"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_GPT2, PRE_LLAMA3 = "gpt-2", "llama-bpe"
LLAMA3_NAMES = (PRE_LLAMA3, "llama3", "llama-v3")


@dataclass
class GGMLVocab:
    """The ``tokenizer.ggml.*`` values for a byte-level BPE ("gpt2") vocabulary."""

    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]  # index = token id; one per row of token_embd
    token_types: list[int]
    merges: list[str]  # "left right", highest priority first
    add_bos: bool


def _pre_tokenizer_name(spec: dict | None) -> str | None:
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return PRE_GPT2
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2:
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex") if isinstance(split, dict) else None
        if (split.get("type") == "Split" and pattern == LLAMA3_PATTERN and isinstance(byte_level, dict)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)):
            return PRE_LLAMA3
    return None


def _adds_bos(post: dict | None) -> bool:
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post.get("processors") or [])
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]


def ggml_vocab(tokenizer_json: str, vocab_size: int, source: str) -> GGMLVocab:
    """llama.cpp's vocabulary for a HF byte-level BPE tokenizer.json, padded to ``vocab_size`` tokens."""
    try:
        spec = json.loads(tokenizer_json)
        model = spec["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{source}: tokenizer.json is not a BPE tokenizer file") from None
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        raise UnsupportedModelError(
            f"{source}: only byte-level BPE tokenizers (GPT-2 or Llama-3 pre-tokenization) can be written as "
            f"llama.cpp's gpt2 vocabulary; this one is {model.get('type')} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}")
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    entries = [(text, idx, NORMAL) for text, idx in vocab.items()]
    entries += [(a["content"], a["id"], CONTROL if a.get("special") else USER_DEFINED)
                for a in spec.get("added_tokens") or []]
    for text, idx, kind in entries:
        if not 0 <= idx < vocab_size:
            raise UnsupportedModelError(f"{source}: token {text!r} has id {idx}, outside the vocabulary of {vocab_size}")
        tokens[idx], types[idx] = text, kind
    filled = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # as convert_hf_to_gguf does
    merge_lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return GGMLVocab(pre, filled, types, merge_lines, _adds_bos(spec.get("post_processor")))


def tokenizer_json_from_ggml(model: str, pre: str | None, tokens: list[str], token_types: list[int],
                             merges: list[str], bos_id: int | None, add_bos: bool, source: str) -> str:
    """Rebuild a HF tokenizer.json (text) from a GGUF ``gpt2`` vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if model != "gpt2":
        raise UnsupportedModelError(
            f"{source}: tokenizer model {model!r} cannot be rebuilt (only 'gpt2' byte-level BPE); "
            f"re-export the GGUF with the tokenizer.huggingface.json key")
    pre = pre or PRE_GPT2
    if pre not in (PRE_GPT2, *LLAMA3_NAMES):
        raise UnsupportedModelError(
            f"{source}: pre-tokenizer {pre!r} cannot be rebuilt (supported: {PRE_GPT2}, {', '.join(LLAMA3_NAMES)})")
    if len(token_types) != len(tokens):
        raise CheckpointError(f"{source}: {len(token_types)} token types for {len(tokens)} tokens")
    vocab = {text: i for i, text in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{source}: the token list repeats token strings; cannot rebuild the tokenizer")
    pairs = []
    for line in merges:
        cut = line.find(" ", 1)  # as llama.cpp splits merges
        if cut < 0:
            raise CheckpointError(f"{source}: merge {line[:40]!r} is not two tokens separated by a space")
        pairs.append((line[:cut], line[cut + 1 :]))
    llama3 = pre in LLAMA3_NAMES
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, token_types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, token_types) if k == USER_DEFINED])
    if add_bos and bos_id is not None and 0 <= bos_id < len(tokens):
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tok.to_str()
