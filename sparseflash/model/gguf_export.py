"""Write a checkpoint (HF folder or .gguf) as a GGUF file that llama.cpp loads and runs.

Phases: load and check (architecture, tensors, tokenizer) -> build metadata and tensors in
llama.cpp's conventions (gguf_mapping) -> write with gguf.GGUFWriter to a temporary file in the
destination folder -> fsync and rename into place. A failed export leaves no partial file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseflash.errors import CheckpointError, SparseflashError
from sparseflash.model.config import ModelConfig
from sparseflash.model.gguf_mapping import (
    GGUF_LAYER_NAMES,
    GGUF_TOP_NAMES,
    KEY_EOS_IDS,
    KEY_ROPE_SCALING,
    KEY_SOURCE,
    KEY_SOURCE_HASH,
    ROPE_FREQS,
    GGUFArch,
    check_exportable,
    llama3_rope_factors,
    to_gguf_tensor,
)
from sparseflash.model.gguf_tokenizer import GGMLVocab, ggml_vocab
from sparseflash.model.weights import ModelWeights

DTYPES = ("f32", "f16", "bf16")  # for matrices; vectors (norms, biases) stay f32 as in convert_hf_to_gguf
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType
KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    arch: str
    dtype: str
    tensors: int
    nbytes: int  # size of the written file
    tokenizer_pre: str  # llama.cpp pre-tokenizer name written


@dataclass
class _Source:
    config: ModelConfig
    weights: ModelWeights
    tokenizer_json: str
    name: str
    content_hash: str


def _read_tokenizer(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tokenizer.json not found") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: tokenizer.json is not UTF-8 text") from None


def _load_source(source: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> _Source:
    source = Path(source)
    override = _read_tokenizer(Path(tokenizer)) if tokenizer is not None else None
    if source.suffix == ".gguf":
        from sparseflash.model.gguf_import import gguf_hash, load_gguf

        g = load_gguf(source, tokenizer_json=override)
        return _Source(g.config, g.weights, g.tokenizer_json, source.stem, gguf_hash(source))
    from sparseflash.model.checkpoint import checkpoint_hash, load_checkpoint

    ckpt = load_checkpoint(source)
    text = override if override is not None else _read_tokenizer(ckpt.tokenizer_path)
    return _Source(ckpt.config, ckpt.weights, text, ckpt.path.resolve().name, checkpoint_hash(ckpt.path))


def _matrix(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object | None]:
    """(array, raw ggml type or None) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType

    if t.dim() == 1 or dtype == "f32":
        return t.float().contiguous().numpy(), None
    if dtype == "f16":
        return t.half().contiguous().numpy(), None
    bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return bits, GGMLQuantizationType.BF16


def gguf_tensors(config: ModelConfig, weights: ModelWeights, arch: GGUFArch) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor in llama.cpp's convention, in file order."""
    out: dict[str, torch.Tensor] = {"token_embd.weight": to_gguf_tensor(arch, config, "embed", weights.embed)}
    if config.rope_scaling.get("rope_type") == "llama3":
        out[ROPE_FREQS] = llama3_rope_factors(config)
    for i, layer in enumerate(weights.layers):
        for field, t in layer.named().items():
            out[f"blk.{i}.{GGUF_LAYER_NAMES[field]}"] = to_gguf_tensor(arch, config, field, t)
    out[GGUF_TOP_NAMES["final_norm_w"]] = to_gguf_tensor(arch, config, "final_norm_w", weights.final_norm_w)
    if weights.final_norm_b is not None:
        out[GGUF_TOP_NAMES["final_norm_b"]] = weights.final_norm_b.float()
    if weights.lm_head is not weights.embed or arch.output_required:
        out[GGUF_TOP_NAMES["lm_head"]] = weights.lm_head.float()
    return out


def _write_metadata(w, c: ModelConfig, arch: GGUFArch, vocab: GGMLVocab, src: _Source, dtype: str) -> None:
    from gguf import RopeScalingType

    w.add_name(src.name)
    w.add_file_type(FILE_TYPES[dtype])
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    if arch.norm == "layernorm1p":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
    s = c.rope_scaling
    kind = s.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.get("factor") or c.max_position_embeddings / s["original_max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
        if s.get("beta_fast"):
            w.add_rope_scaling_yarn_beta_fast(s["beta_fast"])
        if s.get("beta_slow"):
            w.add_rope_scaling_yarn_beta_slow(s["beta_slow"])
    elif kind == "default":
        w.add_rope_scaling_type(RopeScalingType.NONE)
    if kind != "default":  # llama3 has no GGUF keys (only rope_freqs); yarn extras neither
        w.add_string(KEY_ROPE_SCALING, json.dumps(s, sort_keys=True))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_ids:
        w.add_eos_token_id(c.eos_ids[0])
    if isinstance(c.eos_token_id, list):
        w.add_array(KEY_EOS_IDS, list(c.eos_token_id))
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    w.add_string(KEY_TOKENIZER_JSON, src.tokenizer_json)
    w.add_string(KEY_SOURCE, src.name)
    w.add_string(KEY_SOURCE_HASH, src.content_hash)


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32",
                tokenizer: str | os.PathLike | None = None) -> ExportResult:
    """Write ``source`` (HF checkpoint folder or .gguf) to ``out`` as GGUF for llama.cpp.

    ``dtype`` (f32, f16, bf16) applies to matrices; norm weights and biases are written as f32.
    ``tokenizer`` (a tokenizer.json) replaces the source's tokenizer. A quantized GGUF source is
    written dequantized (at ``dtype``).
    Raises UnsupportedModelError for what llama.cpp's nemotron/arcee/llama cannot express.
    """
    from gguf import GGUFWriter

    if dtype not in DTYPES:
        raise SparseflashError(f"--dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    out = Path(out)
    if not out.parent.is_dir():
        raise SparseflashError(f"{out.parent}: output folder does not exist")
    src = _load_source(source, tokenizer)
    present = {f for layer in src.weights.layers for f in layer.named()}
    arch = check_exportable(src.config, present)
    vocab = ggml_vocab(src.tokenizer_json, src.config.vocab_size, str(source))
    tensors = gguf_tensors(src.config, src.weights, arch)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = GGUFWriter(tmp, src.config.arch)
        _write_metadata(writer, src.config, arch, vocab, src, dtype)
        for name, t in tensors.items():
            array, raw_dtype = _matrix(t, dtype)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise SparseflashError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, src.config.arch, dtype, len(tensors), out.stat().st_size, vocab.pre)
