"""Open a .sflash layout file: config, tokenizer and resident weights, as the runtime sees them.

FFN neurons stay in stored order (the layout's permutation), which computes the same function as
checkpoint order; ``with_ffn=True`` also loads every bundle (a dense in-memory model, used as the
reference the streamed engine is checked against and to record true active sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sparseflash.errors import ArtefactError
from sparseflash.layout.format import LayoutError, LayoutFile
from sparseflash.model.config import ModelConfig
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.weights import LayerWeights, ModelWeights

LAYOUT_KIND = "sparseflash-layout"
ATTENTION_FIELDS = ("attn_norm_w", "attn_norm_b", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo",
                    "ffn_norm_w", "ffn_norm_b", "b_down", "b_up", "b_gate")


def tensor_f32(f: LayoutFile, name: str) -> torch.Tensor:
    """A resident tensor as float32 (bf16 bits widened)."""
    entry = f.tensors[name]
    arr = f.tensor(name)
    if entry.dtype == "bf16":
        return torch.from_numpy(arr.astype(np.uint32) << 16).view(torch.float32)
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def tensor_for_compute(f: LayoutFile, name: str) -> torch.Tensor:
    """A resident tensor as the runtime holds it: f16 stays f16 (torch computes with it on the CPU at
    about f32 speed, in half the memory); bf16 is widened to f32 (CPU bf16 matmul is very slow here)."""
    if f.tensors[name].dtype == "f16":
        return torch.from_numpy(np.asarray(f.tensor(name)))
    return tensor_f32(f, name)


def bundles_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


@dataclass
class LayoutModel:
    path: str
    file: LayoutFile
    header: dict
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: ModelWeights  # FFN weights present only with with_ffn=True

    def close(self) -> None:
        self.file.close()


def open_layout(path: str | os.PathLike, with_ffn: bool = False, verify: bool = False) -> LayoutModel:
    """Open and validate a layout file; load resident weights (and all FFN bundles if asked)."""
    try:
        f = LayoutFile.open(path, verify=verify)
    except FileNotFoundError:
        raise ArtefactError(f"{path}: layout file not found; run `sparseflash layout` first") from None
    except LayoutError as e:
        raise ArtefactError(str(e)) from None
    header = f.header
    if header.get("kind") != LAYOUT_KIND:
        f.close()
        raise ArtefactError(f"{path}: header.kind is {header.get('kind')!r}, not a sparseflash model layout")
    try:
        config = ModelConfig.from_dict(header["model"])
        tokenizer = TextTokenizer.from_json(header["tokenizer_json"], f"{path} tokenizer")
    except (KeyError, TypeError) as e:
        f.close()
        raise ArtefactError(f"{path}: header lacks or mangles {e}") from None
    if len(f.layers) != config.num_layers:
        f.close()
        raise ArtefactError(f"{path}: {len(f.layers)} FFN regions for a {config.num_layers}-layer model")
    names = set(f.tensor_names)

    def get(name):
        return tensor_for_compute(f, name) if name in names else None

    layers = []
    for l in range(config.num_layers):
        fields = {k: get(f"layers.{l}.{k}") for k in ATTENTION_FIELDS}
        if with_ffn:
            region = f.layers[l]
            rows = bundles_f32(f.read_bundles(l, start=0, count=region.n_neurons), region.dtype)
            d = config.hidden_size
            parts = [torch.from_numpy(np.ascontiguousarray(rows[:, i * d : (i + 1) * d])) for i in range(rows.shape[1] // d)]
            if config.gated:
                fields["w_gate"], fields["w_up"], down = parts
            else:
                fields["w_up"], down = parts
            fields["w_down"] = down.T.contiguous()
        layers.append(LayerWeights(**fields))
    embed = get("embed")
    weights = ModelWeights(embed=embed, layers=layers, final_norm_w=get("final_norm_w"),
                           final_norm_b=get("final_norm_b"), lm_head=get("lm_head") if "lm_head" in names else embed)
    return LayoutModel(str(path), f, header, config, tokenizer, weights)
