"""llama.cpp's byte-level BPE pre-tokenizer names (``tokenizer.ggml.pre``) and the HF pre-tokenizers they stand for.

A GGUF made by llama.cpp's ``convert_hf_to_gguf.py`` keeps no tokenizer.json: it names the
pre-tokenizer (how text is cut into words before BPE) by the model family it came from, and
llama.cpp's ``llama-vocab.cpp`` re-implements each one as a list of regexes. To rebuild the
tokenizer *as published*, each name maps here to the ``pre_tokenizer`` of the family's published
tokenizer.json (HF ``tokenizers`` JSON): a ``Sequence`` of regex ``Split`` steps (the original
regex where llama.cpp quotes it; it rewrites some for its own regex engine), ``Digits``,
``Punctuation`` and a closing ``ByteLevel``. Where llama.cpp gives no original, its own regex
list is used (``LLAMA_CPP_ONLY``). Also per name: whether the BPE model ignores merges for
words already in the vocabulary (llama.cpp's ``ignore_merges``) and the NFC normalizer of the
Qwen tokenizers.

Names whose pre-tokenizer is not byte-level BPE or needs code of llama.cpp's own (``kimi-k2``,
``afmoe``, ``superbpe``, ``chameleon``, ``gemma4``, ``sarvam-moe``, ``whitespace``) are not
here: such a GGUF needs ``--tokenizer tokenizer.json``.
"""

from __future__ import annotations

from dataclasses import dataclass


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool, trim_offsets: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": use_regex}


def _digits(individual: bool) -> dict:
    return {"type": "Digits", "individual_digits": individual}


def _seq(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


def _regexes(*regexes: str, trim_offsets: bool = True) -> dict:
    return _seq(*(_split(r) for r in regexes), _byte_level(False, trim_offsets))


_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"  # ByteLevel's own
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CASED_WORDS = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?")
GPT4O = _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # tiktoken o200k
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}")
SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
BAILING = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
              r"|\s*[\r\n]|\s+(?!\S)|\s+")
MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TINY_AYA_DIGITS = r"\d{1,3}(?=(?:\d{3})*\b)"
BLOOM = r" ?[^(\s|[.,!?…。，、।۔،])]+"
# DeepSeek's explicit letter ranges (its tokenizer.json spells them out instead of \p{L})
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
    "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
    "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
    "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a"
    "-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-"
    "\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
    "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
    "\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
    "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's regexes for families whose published original it does not quote
_LLAMA_CPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")
_SPARK = (r"\p{N}{1,3}", _CJK_KANA,
          r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
          r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}")
_YOUTU = ("[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA,
          rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LAGUNA = (r"[^\n]+|[\n]+", QWEN2)
_GRANITE_EMB = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
                r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What one ``tokenizer.ggml.pre`` name means as a HF tokenizer."""

    spec: dict  # HF pre_tokenizer JSON
    ignore_merges: bool = False  # BPE: a word already in the vocabulary is one token
    nfc: bool = False  # NFC normalizer before pre-tokenization (Qwen)


GPT2 = PreTokenizer(_byte_level(True))
_DIGITS_GPT2 = PreTokenizer(_seq(_digits(True), _byte_level(True)))
_LLAMA3 = PreTokenizer(_regexes(LLAMA3), ignore_merges=True)
_CL100K = PreTokenizer(_regexes(LLAMA3))
_QWEN2 = PreTokenizer(_regexes(QWEN2, trim_offsets=False), nfc=True)
_QWEN2_REGEX = PreTokenizer(_regexes(QWEN2, trim_offsets=False))
_GPT4O = PreTokenizer(_regexes(GPT4O))
_BLOOM = PreTokenizer(_regexes(BLOOM))

# name -> meaning; the first name of a meaning is the one export writes for it
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais", "phi-2", "gigachat", "jina-es", "jina-de", "jina-v2-es",
                     "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "a.x-4.0", "mellum", "modern-bert",
                     "exaone4", "trillion", "granite-docling"), GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), _CL100K),
    **dict.fromkeys(("glm4", "glm5"), _LLAMA3),
    **dict.fromkeys(("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    _DIGITS_GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2"), _QWEN2),
    **dict.fromkeys(("stablelm2", "hunyuan", "solar-open", "grok-2"), _QWEN2_REGEX),
    "qwen35": PreTokenizer(_regexes(QWEN35, trim_offsets=False), nfc=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "tekken": PreTokenizer(_regexes(TEKKEN), ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), PreTokenizer(_regexes(TINY_AYA_DIGITS, GPT4O))),
    "falcon": PreTokenizer(_seq({"type": "Punctuation", "behavior": "Contiguous"}, _byte_level(True),
                                _digits(False), _split(r"[0-9][0-9][0-9]"))),
    "deepseek-llm": PreTokenizer(_seq(_split("[\r\n]"), _split(rf"\s?[{_DEEPSEEK_LETTERS}]+"),
                                      _split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"), _split(r"\s+$"),
                                      _split(_DEEPSEEK_CJK), _digits(True), _byte_level(False))),
    "deepseek-coder": PreTokenizer(_seq(_split("[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"),
                                        _split(_DEEPSEEK_CJK), _digits(True), _byte_level(False))),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
                    PreTokenizer(_regexes(r"\p{N}{1,3}", _CJK_KANA, DEEPSEEK3))),
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), _BLOOM),
    "viking": PreTokenizer(_seq(_split(BLOOM), _digits(True), _byte_level(False))),
    "jais-2": PreTokenizer(_regexes(JAIS2)),
    "seed-coder": PreTokenizer(_regexes(SEED_CODER)),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizer(_regexes(BAILING))),
    "exaone-moe": PreTokenizer(_regexes(EXAONE_MOE)),
    "minicpm5": PreTokenizer(_regexes(r"\p{N}{1,3}", MINICPM5), ignore_merges=True),
    # llama.cpp's own regexes (no published original quoted there)
    "default": PreTokenizer(_regexes(*_LLAMA_CPP_DEFAULT)),
    "spark2_5": PreTokenizer(_regexes(*_SPARK)),
    "youtu": PreTokenizer(_regexes(*_YOUTU), ignore_merges=True),
    "ufakzeka": PreTokenizer(_regexes(_UFAKZEKA)),
    "laguna": PreTokenizer(_regexes(*_LAGUNA)),
    "granite-embed-multi-97m": PreTokenizer(_regexes(_GRANITE_EMB), ignore_merges=True),
}
LLAMA_CPP_ONLY = ("default", "spark2_5", "youtu", "ufakzeka", "laguna", "granite-embed-multi-97m")
NOT_REBUILDABLE = ("kimi-k2", "afmoe", "superbpe", "chameleon", "gemma4", "granite-embed-multi-311m", "sarvam-moe",
                   "whitespace")


def _step_key(step) -> tuple:
    """What of one pre-tokenizer step decides the ids (offset options such as trim_offsets do not)."""
    if not isinstance(step, dict):
        return ("?", repr(step))
    kind = step.get("type")
    if kind == "Split":
        return (kind, repr(step.get("pattern")), str(step.get("behavior", "")).lower(), bool(step.get("invert")))
    if kind == "ByteLevel":
        return (kind, bool(step.get("add_prefix_space", True)), bool(step.get("use_regex", True)))
    if kind == "Digits":
        return (kind, bool(step.get("individual_digits")))
    if kind == "Punctuation":
        return (kind, str(step.get("behavior", "isolated")).lower())
    return (kind, repr(sorted(step.items())))


def _spec_key(spec) -> tuple:
    steps = spec.get("pretokenizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    return tuple(_step_key(s) for s in steps or [])


def pre_tokenizer_name(spec, ignore_merges: bool) -> str | None:
    """The llama.cpp name for a HF pre_tokenizer (and the BPE model's ignore_merges), or None.

    Among names of the same pre-tokenizer the one whose ignore_merges agrees wins, then the first.
    """
    key = _spec_key(spec)
    names = [n for n, p in PRE_TOKENIZERS.items() if _spec_key(p.spec) == key]
    same = [n for n in names if PRE_TOKENIZERS[n].ignore_merges == ignore_merges]
    return (same or names or [None])[0]
