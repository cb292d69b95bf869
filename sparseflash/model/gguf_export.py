"""Write a checkpoint (HF folder or .gguf) as a GGUF file that llama.cpp loads and runs.

Phases: open the checkpoint lazily and check it (architecture, tensors, tokenizer) -> write the
metadata and tensor infos with gguf.GGUFWriter to a temporary file in the destination folder ->
read, convert to llama.cpp's conventions (gguf_mapping) and write one tensor at a time (a layer is
read once and dropped after its tensors are written) -> fsync and rename into place. Memory: one
layer in float32. A failed export leaves no partial file.
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
from sparseflash.model.source import CheckpointSource
from sparseflash.model.weights import LAYER_FIELDS

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
    source: CheckpointSource
    tokenizer_json: str
    name: str
    content_hash: str

    @property
    def config(self) -> ModelConfig:
        return self.source.config


def _read_tokenizer(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tokenizer.json not found") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: tokenizer.json is not UTF-8 text") from None


def _load_source(source: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> _Source:
    """The checkpoint opened lazily (headers, config and tokenizer only)."""
    source = Path(source)
    override = _read_tokenizer(Path(tokenizer)) if tokenizer is not None else None
    if source.suffix == ".gguf":
        from sparseflash.model.gguf_source import GGUFSource

        g = GGUFSource(source, tokenizer_json=override)
        return _Source(g, g.tokenizer_json, source.stem, g.content_hash())
    from sparseflash.model.safetensors_source import SafetensorsSource

    src = SafetensorsSource(source)
    text = override if override is not None else _read_tokenizer(src.tokenizer_path)
    return _Source(src, text, src.path.resolve().name, src.content_hash())


def _storage(shape: tuple[int, ...], dtype: str) -> tuple[np.dtype, object | None, int]:
    """(numpy dtype, raw ggml type or None, bytes) a tensor of ``shape`` is written with."""
    from gguf import GGMLQuantizationType

    count = int(np.prod(shape))
    if len(shape) == 1 or dtype == "f32":
        return np.dtype(np.float32), None, count * 4
    if dtype == "f16":
        return np.dtype(np.float16), None, count * 2
    return np.dtype(np.uint16), GGMLQuantizationType.BF16, count * 2


def _matrix(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The array GGUFWriter writes for ``t`` (float32 vectors, matrices in ``dtype``)."""
    if t.dim() == 1 or dtype == "f32":
        return t.float().contiguous().numpy()
    if dtype == "f16":
        return t.half().contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def gguf_plan(source: CheckpointSource, arch: GGUFArch) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """(GGUF name, canonical name or None for rope_freqs, torch shape) of every tensor, in file order."""
    c = source.config
    plan = [("token_embd.weight", "embed", source.tensors["embed"].shape)]
    if c.rope_scaling.get("rope_type") == "llama3":
        plan.append((ROPE_FREQS, None, (c.rotary_dim // 2,)))
    for i in range(c.num_layers):
        for field in LAYER_FIELDS:
            name = f"layers.{i}.{field}"
            if name in source.tensors:
                plan.append((f"blk.{i}.{GGUF_LAYER_NAMES[field]}", name, source.tensors[name].shape))
    plan.append((GGUF_TOP_NAMES["final_norm_w"], "final_norm_w", source.tensors["final_norm_w"].shape))
    if source.has("final_norm_b"):
        plan.append((GGUF_TOP_NAMES["final_norm_b"], "final_norm_b", source.tensors["final_norm_b"].shape))
    if not source.tied or arch.output_required:
        plan.append((GGUF_TOP_NAMES["lm_head"], source.head_name, source.tensors[source.head_name].shape))
    return plan


def _gguf_tensor(source: CheckpointSource, arch: GGUFArch, canonical: str | None, layer) -> torch.Tensor:
    """One tensor in llama.cpp's convention (float32); ``layer`` is the LayerWeights being written."""
    c = source.config
    if canonical is None:
        return llama3_rope_factors(c)
    if canonical.startswith("layers."):
        field = canonical.rsplit(".", 1)[1]
        return to_gguf_tensor(arch, c, field, getattr(layer, field))
    return to_gguf_tensor(arch, c, canonical, source.tensor(canonical))


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
    if dtype not in DTYPES:
        raise SparseflashError(f"--dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    out = Path(out)
    if not out.parent.is_dir():
        raise SparseflashError(f"{out.parent}: output folder does not exist")
    src = _load_source(source, tokenizer)
    try:
        present = {k.rsplit(".", 1)[1] for k in src.source.tensors if k.startswith("layers.")}
        arch = check_exportable(src.config, present)
        vocab = ggml_vocab(src.tokenizer_json, src.config.vocab_size, str(source))
        plan = gguf_plan(src.source, arch)
        _write_streamed(out, src, arch, vocab, dtype, plan)
    finally:
        src.source.close()
    return ExportResult(out, src.config.arch, dtype, len(plan), out.stat().st_size, vocab.pre)


def _write_streamed(out: Path, src: _Source, arch: GGUFArch, vocab: GGMLVocab, dtype: str, plan: list) -> None:
    """Header, metadata and tensor infos first, then each tensor as it is read (a layer at a time),
    into a temporary file renamed into place."""
    from gguf import GGUFWriter

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = GGUFWriter(tmp, src.config.arch)
        _write_metadata(writer, src.config, arch, vocab, src, dtype)
        for name, _, shape in plan:
            np_dtype, raw_dtype, nbytes = _storage(shape, dtype)
            writer.add_tensor_info(name, shape, np_dtype, nbytes, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        layer, layer_index = None, -1
        for _, canonical, _ in plan:
            if canonical is not None and canonical.startswith("layers."):
                i = int(canonical.split(".")[1])
                if i != layer_index:
                    layer, layer_index = src.source.layer(i), i  # the previous layer is dropped here
            t = _gguf_tensor(src.source, arch, canonical, layer)
            writer.write_tensor_data(_matrix(t, dtype))
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise SparseflashError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
