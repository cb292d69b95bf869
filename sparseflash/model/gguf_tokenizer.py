"""Tokenizer in GGUF: the HF tokenizer.json as llama.cpp's ``tokenizer.ggml.*`` vocabulary and back.

Export writes both the original tokenizer.json (the standard ``tokenizer.huggingface.json`` key,
which sparseflash reads back verbatim) and the ``gpt2`` (byte-level BPE) vocabulary that
llama.cpp needs: tokens, token types, merges, pre-tokenizer name, special token ids.
Import of a GGUF without the JSON rebuilds a byte-level BPE tokenizer from that vocabulary, with
the pre-tokenizer its ``tokenizer.ggml.pre`` name stands for (gguf_pretok: every byte-level name
llama.cpp knows). Export finds that name from the tokenizer.json's pre-tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sparseflash.errors import CheckpointError, UnsupportedModelError
from sparseflash.model.gguf_pretok import NOT_REBUILDABLE, PRE_TOKENIZERS, pre_tokenizer_name

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
@dataclass
class GGMLVocab:
    """The ``tokenizer.ggml.*`` values for a byte-level BPE ("gpt2") vocabulary."""

    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]  # index = token id; one per row of token_embd
    token_types: list[int]
    merges: list[str]  # "left right", highest priority first
    add_bos: bool


def _adds_bos(post: dict | None) -> bool:
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post.get("processors") or [])
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]


def _describe(spec) -> str:
    if not isinstance(spec, dict):
        return "none"
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    return " + ".join(str(s.get("type")) if isinstance(s, dict) else "?" for s in steps or [])


def ggml_vocab(tokenizer_json: str, vocab_size: int, source: str) -> GGMLVocab:
    """llama.cpp's vocabulary for a HF byte-level BPE tokenizer.json, padded to ``vocab_size`` tokens."""
    try:
        spec = json.loads(tokenizer_json)
        model = spec["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{source}: tokenizer.json is not a BPE tokenizer file") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModelError(
            f"{source}: only byte-level BPE tokenizers can be written as llama.cpp's gpt2 vocabulary; this one is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UnsupportedModelError(f"{source}: the tokenizer's {normalizer} normalizer has no llama.cpp equivalent")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    if pre is None:
        raise UnsupportedModelError(
            f"{source}: the tokenizer's pre-tokenizer ({_describe(spec.get('pre_tokenizer'))}) is none of those "
            f"llama.cpp knows by a tokenizer.ggml.pre name, so llama.cpp would tokenize differently")
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
    """Rebuild a HF tokenizer.json (text) from a GGUF ``gpt2`` vocabulary and pre-tokenizer name.

    A missing name means llama.cpp's ``default``, as llama.cpp reads it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if model != "gpt2":
        raise UnsupportedModelError(
            f"{source}: tokenizer model {model!r} cannot be rebuilt (only 'gpt2' byte-level BPE); "
            f"pass --tokenizer tokenizer.json")
    pre = pre or "default"
    if pre not in PRE_TOKENIZERS:
        why = "is not byte-level BPE as sparseflash rebuilds it" if pre in NOT_REBUILDABLE else "is unknown"
        raise UnsupportedModelError(f"{source}: pre-tokenizer {pre!r} {why}; pass --tokenizer tokenizer.json "
                                    f"(the model's original)")
    meaning = PRE_TOKENIZERS[pre]
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
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=meaning.ignore_merges))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, token_types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, token_types) if k == USER_DEFINED])
    if add_bos and bos_id is not None and 0 <= bos_id < len(tokens):
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = meaning.spec
    spec["normalizer"] = {"type": "NFC"} if meaning.nfc else None
    text = json.dumps(spec, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # a regex the tokenizers package cannot compile
        raise UnsupportedModelError(f"{source}: pre-tokenizer {pre!r} cannot be built ({str(e)[:120]})") from None
    return text
