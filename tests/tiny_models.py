"""Tiny randomly initialised checkpoints of every supported family, saved by transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# The trained model bundled in the package, and its held-out text (the same model as ../shared/models/tiny-relu2,
# so these tests run wherever the package is installed)
TINY_RELU2 = Path(__file__).resolve().parents[1] / "sparseflash" / "models" / "tiny-relu2"
EVAL_CORPUS = TINY_RELU2 / "heldout.txt.zst"
BUNDLED_TOKENIZER = TINY_RELU2 / "tokenizer.json"

VOCAB = 4096  # matches the bundled tokenizer so the folders are complete checkpoints

FAMILIES = {
    # name: (model_type, extra config)
    "nemotron": ("nemotron", dict(hidden_act="relu2", partial_rotary_factor=0.5, num_key_value_heads=2,
                                  head_dim=24, tie_word_embeddings=False)),
    "nemotron-tied": ("nemotron", dict(hidden_act="relu2", partial_rotary_factor=0.5, tie_word_embeddings=True)),
    "arcee": ("arcee", dict(hidden_act="relu2", num_key_value_heads=2, tie_word_embeddings=False)),
    "arcee-yarn": ("arcee", dict(hidden_act="relu2", tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 64})),
    "llama-relu": ("llama", dict(hidden_act="relu", num_key_value_heads=2)),
    "llama-relu2": ("llama", dict(hidden_act="relu2", tie_word_embeddings=True, head_dim=20)),
    "llama-silu": ("llama", dict(hidden_act="silu", attention_bias=True, mlp_bias=True)),
    "llama-gelu": ("llama", dict(hidden_act="gelu", num_key_value_heads=1,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32})),
    "mistral-silu": ("mistral", dict(hidden_act="silu", num_key_value_heads=2, sliding_window=12)),
}


def make_hf_model(family: str, seed: int = 0, layers: int = 2):
    """A transformers model of the family with random weights, norm weights included."""
    import transformers

    model_type, extra = FAMILIES[family]
    cfg_cls = transformers.AutoConfig.for_model(model_type).__class__
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=None)
    base.update(extra)
    config = cfg_cls(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if model_type == "nemotron" else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def save_hf_model(model, folder: Path, shard_size: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    shutil.copy(BUNDLED_TOKENIZER, folder / "tokenizer.json")
    return folder


def to_old_config_layout(folder: Path) -> None:
    """Rewrite config.json in the older layout: rope_theta / partial_rotary_factor / rope_scaling at top level."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type", "default")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    path.write_text(json.dumps(cfg))
