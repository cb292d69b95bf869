"""Open a .sflash model layout: header, config, tokenizer and resident weights, as the runtime sees them.

The container is checked by layout/format (LayoutFile.open), the model contract by layout/schema
(read_header, check_layout), the config values by model/config; with ``verify`` (the default)
every resident tensor's checksum is checked as it is loaded and its values must be finite. Every
failure is one ArtefactError line naming the file and what to rerun. FFN neurons stay in stored order (the
layout's permutation), which computes the same function as checkpoint order; ``with_ffn=True``
also loads every bundle (a dense in-memory model, the reference the streamed engine is checked
against, and what reports use to record true active sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.kernels import KernelInputError, check_quantized_matrix, decode_bundles
from sparseflash.layout import schema
from sparseflash.layout.format import QUANT_TYPES, LayoutError, LayoutFile
from sparseflash.layout.schema import ModelHeader, SchemaError
from sparseflash.model.config import ModelConfig
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.weights import LayerWeights, ModelWeights
from sparseflash.runtime.quant_weights import QuantMatrix


def resident_tensor(f: LayoutFile, name: str, verify: bool = True):
    """A resident tensor as the runtime holds it: f32 and f16 as stored (torch computes with f16
    weights on the CPU at about f32 speed, in half the memory); bf16 widened to f32 (CPU bf16
    matmul is very slow here); q8/q4 kept as their bytes (QuantMatrix). With ``verify``, its crc32
    is checked and its values (or quantization scales) must be finite."""
    entry = f.tensors[name]
    raw = f.tensor(name, verify=verify)
    if entry.dtype in QUANT_TYPES:
        if verify:
            try:
                check_quantized_matrix(raw, entry.shape[-1], entry.dtype)
            except KernelInputError as e:
                raise SchemaError(f.path, f"tensor {name!r}", f"{e}; {schema.REBUILD}") from None
        return QuantMatrix(raw, entry.shape, entry.dtype)
    values = schema.to_float32(raw, "bf16") if entry.dtype == "bf16" else np.asarray(raw)
    if verify and values.dtype.kind == "f":
        bad = _non_finite(values)
        if bad:
            raise SchemaError(f.path, f"tensor {name!r}", f"holds {bad} non-finite values; {schema.REBUILD}")
    return torch.from_numpy(values)


def _non_finite(values: np.ndarray, block: int = 1 << 20) -> int:
    """Count of non-finite values, checked a block of values at a time: a whole-tensor np.isfinite
    would hold a bool copy as large as the tensor has values (65 MB for a 1B model's embedding)
    beside the tensor, outside the budget."""
    flat = values.reshape(-1)
    return sum(int(flat[i : i + block].size - np.isfinite(flat[i : i + block]).sum()) for i in range(0, flat.size, block))


@dataclass
class LayoutModel:
    path: str
    file: LayoutFile
    header: ModelHeader
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: ModelWeights  # FFN weights present only with with_ffn=True

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights as stored (resident tensors + FFN regions)."""
        return sum(t.nbytes for t in self.file.tensors.values()) + sum(r.length for r in self.file.layers)

    @property
    def ffn_bytes(self) -> int:
        """Bytes of every FFN bundle of every layer (what dense streaming reads per token)."""
        return sum(r.n_neurons * r.bundle_bytes for r in self.file.layers)

    def close(self) -> None:
        self.file.close()


def open_layout(path: str | os.PathLike, with_ffn: bool = False, verify: bool = True) -> LayoutModel:
    """Open and validate a layout file; load resident weights, checked (``verify``), and all FFN
    bundles if asked (``with_ffn``, checked against their digests when verifying)."""
    try:
        f = LayoutFile.open(path)
    except FileNotFoundError:
        raise ArtefactError(f"{path}: layout file not found; run `sparseflash prepare` first") from None
    except LayoutError as e:
        raise ArtefactError(str(e)) from None
    try:
        header = schema.read_header(path, f.header)
        schema.check_layout(path, header, f.tensors, f.layers)
        config = ModelConfig.from_dict(header.model)
        tokenizer = TextTokenizer.from_json(header.tokenizer_json, f"{path} tokenizer")
        weights = _weights(f, config, with_ffn, verify)
    except (LayoutError, SparseflashError) as e:
        f.close()
        raise ArtefactError(str(e) if isinstance(e, LayoutError) else f"{path}: {e}") from None
    except BaseException:
        f.close()
        raise
    return LayoutModel(str(path), f, header, config, tokenizer, weights)


def _weights(f: LayoutFile, config: ModelConfig, with_ffn: bool, verify: bool) -> ModelWeights:
    names = set(f.tensor_names)

    def get(name):
        return resident_tensor(f, name, verify) if name in names else None

    layers = []
    for l in range(config.num_layers):
        fields = {k: get(schema.layer_tensor(l, k)) for k in (*schema.LAYER_FIELDS, *schema.NEURON_BIAS_FIELDS)}
        if with_ffn:
            region = f.layers[l]
            rows = decode_bundles(f.read_bundles(l, start=0, count=region.n_neurons, verify=verify),
                                  parts=len(schema.bundle_parts(config.gated)), storage=region.dtype)
            d = config.hidden_size
            parts = dict(zip(schema.bundle_parts(config.gated),
                             (torch.from_numpy(np.ascontiguousarray(rows[:, i * d : (i + 1) * d]))
                              for i in range(rows.shape[1] // d))))
            fields["w_up"], fields["w_gate"] = parts["up"], parts.get("gate")
            fields["w_down"] = parts["down"].T.contiguous()
        layers.append(LayerWeights(**fields))
    embed = get(schema.EMBED)
    return ModelWeights(embed=embed, layers=layers, final_norm_w=get(schema.FINAL_NORM_W),
                        final_norm_b=get(schema.FINAL_NORM_B),
                        lm_head=get(schema.LM_HEAD) if schema.LM_HEAD in names else embed)
