"""Generation: prefill the prompt (optionally compressed by a plugin), then decode one token at a
time (greedy or sampled)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sparseflash.errors import SparseflashError
from sparseflash.model.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from sparseflash.model.plugin import CompressionPlugin


@dataclass(frozen=True)
class Sampling:
    """greedy=True ignores temperature/top_p; otherwise softmax(logits/temperature) cut to top_p mass."""

    greedy: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SparseflashError(f"--temp must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SparseflashError(f"--top-p must be in (0, 1] (1: no cut), got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise SparseflashError(f"--seed must be an integer in [0, 2^63), got {self.seed!r}")


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids
    prefill_s: float
    decode_s: float  # time of the decode steps (every generated token after the first)
    stopped_at_eos: bool = False
    per_token_s: list[float] = field(default_factory=list)
    compression: dict | None = None  # with a plugin: ratio, layer, prompt positions before/after

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time, prompt processing included."""
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self, text: str) -> dict:
        """What `run --json` reports of a generation (``text``: the decoded continuation)."""
        return {"text": text, "tokens": self.tokens, "prompt_tokens": len(self.prompt_tokens),
                "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "prefill_ms": self.prefill_s * 1e3, "stopped_at_eos": self.stopped_at_eos,
                "compression": self.compression}

    def speed_line(self, engine: str) -> str:
        return (f"[{len(self.tokens)} tokens, {self.tokens_per_s:.1f} tokens/s (decode {self.decode_tokens_per_s:.1f} "
                f"tokens/s, prefill {self.prefill_s * 1e3:.0f} ms), {engine}]")


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None, step: int = 0) -> int:
    """Pick the next id from logits (vocab,); ``step`` (0: the token after the prompt) names the
    generation step in the error raised for logits that are not all finite."""
    check_finite_logits(logits, step)
    if sampling.greedy or sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        keep = cumulative - sorted_p < sampling.top_p  # always keeps the most likely token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_finite_logits(logits: torch.Tensor, step: int) -> None:
    """Refuse logits holding NaN or inf: a NaN/inf weight or config value reached the output, and any
    token chosen from them would be meaningless (a last line of defence behind the loaders' checks).
    The sum is finite when every value is (a NaN or inf makes it NaN or inf), so one reduction decides
    the common case; only a non-finite sum (bad values, or finite ones overflowing) looks closer."""
    if logits.dtype.is_floating_point and bool(torch.isfinite(logits.sum(dtype=torch.float64))):
        return
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kind = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
        raise SparseflashError(f"generation step {step}: the model produced {kind} logits ({bad} of {logits.numel()} "
                               "values); its weights or config hold NaN/inf values (check the file with "
                               "`sparseflash inspect --verify` or rebuild it)")


def prefill(model: Transformer, cache: KVCache, prompt: list[int], plugin: CompressionPlugin | None = None
            ) -> torch.Tensor:
    """Process the prompt's tokens together (compressed after the plugin's layer if one is given);
    returns the logits of the last position (vocab,)."""
    return model(torch.tensor([prompt], dtype=torch.long), cache=cache, start=0, last_only=True,
                 plugin=plugin)[0, -1]


def new_generation_cache(model: Transformer, prompt_tokens: int, max_len: int, batch: int = 1,
                         plugin: CompressionPlugin | None = None) -> KVCache:
    """A KV cache for ``max_len`` positions; with a plugin, the layers after it get only the slots a
    compressed prompt of ``prompt_tokens`` leaves them."""
    capacity = None if plugin is None else plugin.kv_capacity(model.config.num_layers, prompt_tokens, max_len)
    return model.new_cache(max_len, batch, capacity)


def continuation_logits(model: Transformer, ids: torch.Tensor, prompt_tokens: int,
                        plugin: CompressionPlugin | None = None) -> tuple[torch.Tensor, KVCache]:
    """Prefill ``ids[:, :prompt_tokens]`` (batch, tokens), then feed the rest in one cached step;
    returns the logits that predict each continuation token (batch, tokens - prompt_tokens, vocab)
    and the cache."""
    b, t = ids.shape
    cache = new_generation_cache(model, prompt_tokens, t, b, plugin)
    last = model(ids[:, :prompt_tokens], cache=cache, start=0, last_only=True, plugin=plugin)
    rest = model(ids[:, prompt_tokens:-1], cache=cache, start=prompt_tokens) if t - prompt_tokens > 1 else last[:, :0]
    return torch.cat((last, rest), dim=1), cache


def decode_one(model: Transformer, cache: KVCache, token: int) -> torch.Tensor:
    """Feed one token at the next position; returns its logits (vocab,)."""
    pos = cache.length
    return model(torch.tensor([[token]], dtype=torch.long), cache=cache, start=pos)[0, -1]


def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_at_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
    plugin: CompressionPlugin | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` ids after ``prompt`` (ids); ``plugin`` compresses the prompt."""
    if not prompt:
        raise SparseflashError("the prompt is empty after tokenisation; give at least one token of text")
    if max_new_tokens < 0:
        raise SparseflashError(f"-n must be >= 0, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    total = len(prompt) + max_new_tokens
    if total > limit:
        raise SparseflashError(
            f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds the model's context of {limit}"
        )
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = new_generation_cache(model, len(prompt), max(total, 1), plugin=plugin)
    eos = set(model.config.eos_ids) if stop_at_eos else set()
    out: list[int] = []
    t0 = time.perf_counter()
    if max_new_tokens == 0:
        return GenerationResult(prompt, out, 0.0, 0.0)
    logits = prefill(model, cache, prompt, plugin)
    prefill_s = time.perf_counter() - t0
    compression = None
    if plugin is not None:
        g = plugin.groups(len(prompt))
        compression = {"ratio": plugin.ratio, "layer": plugin.layer, "prompt_positions": len(prompt),
                       "compressed_positions": len(prompt) - g * (plugin.ratio - 1)}
    per_token = []
    t1 = time.perf_counter()
    stopped = False
    while True:
        token = sample_token(logits, sampling, generator, step=len(out))
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            stopped = True
            break
        if len(out) == max_new_tokens:
            break
        ts = time.perf_counter()
        logits = decode_one(model, cache, token)
        per_token.append(time.perf_counter() - ts)
    return GenerationResult(prompt, out, prefill_s, time.perf_counter() - t1, stopped, per_token, compression)
