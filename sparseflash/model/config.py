"""Model configuration: one dataclass for every supported family, read from HF config.json.

Both config.json layouts are accepted: the older one (``rope_theta``, ``rope_scaling``,
``partial_rotary_factor`` at top level) and the newer one (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sparseflash.errors import UnsupportedModelError

# model_type -> (norm kind, gated FFN, default activation)
ARCHITECTURES = {
    "nemotron": ("layernorm1p", False, "relu2"),
    "arcee": ("rmsnorm", False, "relu2"),
    "llama": ("rmsnorm", True, "silu"),
    "mistral": ("rmsnorm", True, "silu"),
}
# HF hidden_act spelling -> our activation name
ACTIVATIONS = {
    "relu": "relu",
    "relu2": "relu2",
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer with a ReLU²-family (or GLU) FFN."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # FFN neurons per layer
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str  # relu, relu2, silu, gelu, gelu_tanh
    gated: bool  # gate * act(...) FFN (ReGLU, SwiGLU, ...) vs plain act(up x)
    norm: str  # layernorm1p | rmsnorm
    norm_eps: float
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict = field(default_factory=dict)  # rope_type and its parameters
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        """Refuse values no model has: a config read from a file is checked here, once."""
        def bad(name, problem):
            raise UnsupportedModelError(f"model config: {name} {problem} (got {getattr(self, name)!r})")

        if self.arch not in ARCHITECTURES:
            bad("arch", f"must be one of {', '.join(sorted(ARCHITECTURES))}")
        if self.activation not in set(ACTIVATIONS.values()):
            bad("activation", f"must be one of {', '.join(sorted(set(ACTIVATIONS.values())))}")
        if self.norm not in ("layernorm1p", "rmsnorm"):
            bad("norm", "must be layernorm1p or rmsnorm")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be a positive integer")
        for name in ("gated", "tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        for name in ("norm_eps", "rope_theta", "partial_rotary_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                bad(name, "must be a finite positive number")
        if not isinstance(self.rope_scaling, dict) or self.rope_scaling.get("rope_type", "default") not in ROPE_TYPES:
            bad("rope_scaling", f"must be an object with rope_type in {', '.join(ROPE_TYPES)}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            bad("sliding_window", "must be null or a positive integer")
        _check_shapes_and_ids(self, bad)

    @property
    def ffn_kind(self) -> str:
        """Kernel name of the FFN: relu2, relu, reglu, relu2glu, swiglu, geglu, geglu_tanh, ..."""
        if not self.gated:
            return self.activation
        return {"relu": "reglu", "relu2": "relu2glu", "silu": "swiglu", "gelu": "geglu",
                "gelu_tanh": "geglu_tanh"}[self.activation]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def ffn_param_count(self) -> int:
        """FFN weights of one layer, in values (biases excluded)."""
        return (3 if self.gated else 2) * self.hidden_size * self.intermediate_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The config as to_dict() wrote it; a missing, unknown or ill-typed field is an UnsupportedModelError."""
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"model config must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UnsupportedModelError(f"model config has an unknown field {unknown[0]!r} (a newer sparseflash?)")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise UnsupportedModelError(f"model config lacks the field {missing[0]!r}")
        return cls(**d)


# rope_type -> parameters it cannot do without (HF names), each a finite positive number
ROPE_NEEDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"),
              "yarn": ("original_max_position_embeddings",)}


def _check_shapes_and_ids(c: ModelConfig, bad) -> None:
    """What a config must also hold to run: whole heads per KV head, an even rotary dimension inside the
    head, the parameters of its RoPE variant, token ids inside the vocabulary."""
    if c.num_heads % c.num_kv_heads:
        bad("num_heads", f"must be a multiple of num_kv_heads ({c.num_kv_heads})")
    if c.partial_rotary_factor > 1 or c.rotary_dim % 2 or c.rotary_dim < 2:
        bad("partial_rotary_factor", f"must give an even rotary dimension in [2, head_dim {c.head_dim}]")
    kind = c.rope_scaling.get("rope_type", "default")
    for key in ROPE_NEEDS.get(kind, ()):
        value = c.rope_scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            bad("rope_scaling", f"of type {kind} needs {key}, a finite positive number")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(c, name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < c.vocab_size
                                         for i in ids):
            bad(name, f"must be null or token ids in [0, vocab_size {c.vocab_size})")


def _rope_from_hf(cfg: dict) -> tuple[float, float, dict]:
    """(rope_theta, partial_rotary_factor, scaling dict) from either config.json layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        partial = cfg.get("partial_rotary_factor", cfg.get("rope_percent", 1.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    if scaling["rope_type"] not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {scaling['rope_type']!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    return float(theta), float(partial), scaling


def config_from_hf(cfg: dict) -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config.json."""
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    norm, gated, default_act = ARCHITECTURES[arch]
    hf_act = cfg.get("hidden_act", default_act)
    if hf_act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"hidden_act {hf_act!r} is not supported for {arch} (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        theta, partial, scaling = _rope_from_hf(cfg)
        eps_key = "norm_eps" if arch == "nemotron" else "rms_norm_eps"
        default_eps = 1e-5 if arch == "nemotron" else 1e-6
        conf = ModelConfig(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            activation=ACTIVATIONS[hf_act],
            gated=gated,
            norm=norm,
            norm_eps=float(cfg.get(eps_key, cfg.get("layer_norm_eps", default_eps))),
            rope_theta=theta,
            partial_rotary_factor=partial,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window") if arch == "mistral" else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except KeyError as e:
        raise UnsupportedModelError(f"config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"config.json has a malformed field: {e}") from None
    if conf.num_heads % conf.num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads {conf.num_heads} is not a multiple of num_key_value_heads {conf.num_kv_heads}"
        )
    if conf.rotary_dim % 2 or not 0 < conf.rotary_dim <= conf.head_dim:
        raise UnsupportedModelError(f"rotary dimension {conf.rotary_dim} is invalid for head_dim {conf.head_dim}")
    return conf


def rope_inv_freq(conf: ModelConfig):
    """Inverse frequencies (rotary_dim / 2,) and the attention scaling of the model's RoPE variant."""
    import torch

    dim = conf.rotary_dim
    base = conf.rope_theta
    s = conf.rope_scaling
    kind = s.get("rope_type", "default")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor = s.get("factor") or conf.max_position_embeddings / s["original_max_position_embeddings"]
    orig = s["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)
