"""Open a .sflash model layout: header, config, tokenizer and resident weights, as the runtime sees them.

The container is checked by layout/format (LayoutFile.open), the model contract by layout/schema
(read_header, check_layout), the config values by model/config; every failure is one
ArtefactError line naming the file and what to rerun. FFN neurons stay in stored order (the
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
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutError, LayoutFile
from sparseflash.layout.schema import ModelHeader
from sparseflash.model.config import ModelConfig
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.weights import LayerWeights, ModelWeights


def resident_tensor(f: LayoutFile, name: str) -> torch.Tensor:
    """A resident tensor as the runtime holds it: f32 and f16 as stored (torch computes with f16
    weights on the CPU at about f32 speed, in half the memory); bf16 widened to f32 (CPU bf16
    matmul is very slow here)."""
    entry = f.tensors[name]
    raw = f.tensor(name)
    if entry.dtype == "bf16":
        return torch.from_numpy(schema.to_float32(raw, "bf16"))
    return torch.from_numpy(np.asarray(raw))


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


def open_layout(path: str | os.PathLike, with_ffn: bool = False, verify: bool = False) -> LayoutModel:
    """Open and validate a layout file; load resident weights (and all FFN bundles if asked)."""
    try:
        f = LayoutFile.open(path, verify=verify)
    except FileNotFoundError:
        raise ArtefactError(f"{path}: layout file not found; run `sparseflash prepare` first") from None
    except LayoutError as e:
        raise ArtefactError(str(e)) from None
    try:
        header = schema.read_header(path, f.header)
        schema.check_layout(path, header, f.tensors, f.layers)
        config = ModelConfig.from_dict(header.model)
        tokenizer = TextTokenizer.from_json(header.tokenizer_json, f"{path} tokenizer")
        weights = _weights(f, config, with_ffn)
    except (LayoutError, SparseflashError) as e:
        f.close()
        raise ArtefactError(str(e) if isinstance(e, LayoutError) else f"{path}: {e}") from None
    except BaseException:
        f.close()
        raise
    return LayoutModel(str(path), f, header, config, tokenizer, weights)


def _weights(f: LayoutFile, config: ModelConfig, with_ffn: bool) -> ModelWeights:
    names = set(f.tensor_names)

    def get(name):
        return resident_tensor(f, name) if name in names else None

    layers = []
    for l in range(config.num_layers):
        fields = {k: get(schema.layer_tensor(l, k)) for k in (*schema.LAYER_FIELDS, *schema.NEURON_BIAS_FIELDS)}
        if with_ffn:
            region = f.layers[l]
            rows = schema.to_float32(f.read_bundles(l, start=0, count=region.n_neurons), region.dtype)
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
