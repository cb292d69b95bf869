"""Compression plugins (Variator, adapted to a causal decoder): merge groups of prompt tokens.

A plugin sits after layer L of a frozen model. During prefill, layers 0..L see every prompt token;
then each group of ``ratio`` consecutive hidden vectors becomes one vector, so layers L+1.. run on
a sequence about ``ratio`` times shorter and hold that many fewer KV slots. The last ``tail`` (to
``tail + ratio - 1``) prompt tokens stay uncompressed, so decoding starts from exact recent state.

The module is small: a per-channel weighted sum of the group (initialised to the mean, so that a
ratio-1 plugin is the identity) plus a residual bottleneck MLP over the normalised, concatenated
group (output layer initialised to zero). The file is safetensors with one JSON metadata entry
(format version, ratio, layer, tail, rank, rotary rule, hidden size, source checkpoint hash,
held-out quality); ``load_plugin`` validates all of it. docs/plugins.md explains the choices.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparseflash.errors import ArtefactError

PLUGIN_KIND = "sparseflash-plugin"
PLUGIN_VERSION = 1
METADATA_KEY = "sparseflash"
ROPE_RULES = ("last", "mean")  # rotary position of a group: its last token's, or the mean of its tokens'
TENSOR_NAMES = ("mix", "down.weight", "down.bias", "up.weight", "up.bias")


class PluginError(ArtefactError):
    """A plugin file is missing, corrupt, or made for another model."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin is: sizes, where it sits, and what it was made from."""

    ratio: int  # prompt tokens per compressed vector
    layer: int  # compression after this layer's output (0-based); layers > layer run compressed
    hidden_size: int
    tail: int = 16  # at least this many last prompt tokens stay uncompressed
    rank: int = 32  # bottleneck width of the residual MLP
    rope: str = "mean"  # rotary position of a compressed vector, one of ROPE_RULES
    source_hash: str = ""  # checkpoint_hash of the model it was trained on

    def check(self, where: str = "plugin") -> None:
        if self.ratio < 1 or self.layer < 0 or self.tail < 0 or self.rank < 1 or self.hidden_size < 1:
            raise PluginError(f"{where}: ratio, rank, hidden_size must be >= 1 and layer, tail >= 0 "
                              f"(got ratio {self.ratio}, layer {self.layer}, tail {self.tail}, rank {self.rank})")
        if self.rope not in ROPE_RULES:
            raise PluginError(f"{where}: rope must be one of {', '.join(ROPE_RULES)}, got {self.rope!r}")


class CompressionPlugin(nn.Module):
    """Maps groups (batch, groups, ratio, d) of hidden vectors to (batch, groups, d)."""

    def __init__(self, spec: PluginSpec, quality: dict | None = None, training: dict | None = None):
        super().__init__()
        spec.check()
        self.spec = spec
        k, d, r = spec.ratio, spec.hidden_size, spec.rank
        self.mix = nn.Parameter(torch.full((k, d), 1.0 / k))  # per-slot, per-channel weights: the mean
        self.down = nn.Linear(k * d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)  # the residual starts at zero: the plugin starts as the mean
        nn.init.zeros_(self.up.bias)
        self.quality = quality or {}  # held-out measurements made at training time
        self.training_record = training or {}  # how it was trained (steps, loss, wall time, ...)

    ratio = property(lambda self: self.spec.ratio)
    layer = property(lambda self: self.spec.layer)
    tail = property(lambda self: self.spec.tail)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, d = groups.shape
        base = (groups * self.mix).sum(dim=2)
        if g == 0:
            return base
        normed = F.layer_norm(groups, (d,)).reshape(b, g, k * d)
        return base + self.up(F.gelu(self.down(normed)))

    def groups(self, prompt_tokens: int) -> int:
        """Groups compressed in a prompt of ``prompt_tokens``: as many as leave >= ``tail`` tokens."""
        return max(0, (prompt_tokens - self.tail) // self.ratio)

    def positions(self, groups: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotary positions (float), last covered positions (long)) of the compressed sequence of a
        ``tokens``-long input whose first ``groups`` groups are compressed: groups, then the tail."""
        k = self.ratio
        last = torch.arange(groups) * k + (k - 1)
        rope = last.double() if self.spec.rope == "last" else last.double() - (k - 1) / 2
        tail = torch.arange(groups * k, tokens)
        return torch.cat((rope, tail.double())), torch.cat((last, tail))

    def kv_capacity(self, num_layers: int, prompt_tokens: int, max_len: int) -> list[int]:
        """KV slots per layer for a compressed prompt of ``prompt_tokens`` in a ``max_len``-position run."""
        g = self.groups(prompt_tokens)
        short = max_len - g * (self.ratio - 1)
        return [max_len if i <= self.layer else short for i in range(num_layers)]

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def nbytes(self) -> int:
        """Bytes of the plugin's parameters in memory."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def describe(self) -> str:
        return f"ratio {self.ratio} after layer {self.layer} (tail {self.tail}, {self.param_count:,} parameters)"


@dataclass
class PluginFile:
    """Everything a plugin file's metadata holds."""

    spec: PluginSpec
    quality: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


def save_plugin(plugin: CompressionPlugin, path: str | os.PathLike) -> None:
    """Write ``plugin`` to ``path`` (safetensors; temp file renamed into place)."""
    from safetensors.torch import save_file

    meta = {"kind": PLUGIN_KIND, "version": PLUGIN_VERSION, **asdict(plugin.spec),
            "quality": plugin.quality, "training": plugin.training_record}
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in plugin.state_dict().items()}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_metadata(path: str, raw: dict | None) -> PluginFile:
    if not raw or METADATA_KEY not in raw:
        raise PluginError(f"{path}: not a sparseflash plugin (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PluginError(f"{path}: plugin metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("kind") != PLUGIN_KIND:
        raise PluginError(f"{path}: metadata kind is {meta.get('kind') if isinstance(meta, dict) else meta!r}, "
                          f"not {PLUGIN_KIND}")
    if meta.get("version") != PLUGIN_VERSION:
        raise PluginError(f"{path}: plugin format version {meta.get('version')!r}, this sparseflash reads "
                          f"version {PLUGIN_VERSION}")
    kinds = {"ratio": int, "layer": int, "hidden_size": int, "tail": int, "rank": int, "rope": str, "source_hash": str}
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise PluginError(f"{path}: metadata field {key!r} is {meta.get(key)!r}, expected {kind.__name__}")
    for key in ("quality", "training"):
        if not isinstance(meta.get(key, {}), dict):
            raise PluginError(f"{path}: metadata field {key!r} is not an object")
    spec = PluginSpec(**{k: meta[k] for k in kinds})
    spec.check(path)
    return PluginFile(spec, meta.get("quality", {}), meta.get("training", {}))


def read_plugin_file(path: str | os.PathLike) -> tuple[PluginFile, dict[str, torch.Tensor]]:
    """Metadata and tensors of a plugin file, validated (kind, version, fields, names, shapes, values)."""
    from safetensors import SafetensorError, safe_open

    from sparseflash.paths import input_file

    path = os.fspath(path)
    if os.path.exists(path):
        input_file(path, "plugin file")  # a FIFO would block the open
    try:
        with safe_open(path, framework="pt") as f:
            pf = _read_metadata(path, f.metadata())
            names = set(f.keys())
            if names != set(TENSOR_NAMES):
                raise PluginError(f"{path}: tensors {sorted(names)}, expected {sorted(TENSOR_NAMES)}")
            tensors = {name: f.get_tensor(name) for name in TENSOR_NAMES}
    except FileNotFoundError:
        raise PluginError(f"{path}: plugin file not found") from None
    except IsADirectoryError:
        raise PluginError(f"{path}: is a directory, expected a plugin file") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PluginError(f"{path}: cannot read plugin file ({msg}); is it truncated or corrupt?") from None
    s = pf.spec
    k, d, r = s.ratio, s.hidden_size, s.rank
    shapes = {"mix": (k, d), "down.weight": (r, k * d), "down.bias": (r,), "up.weight": (d, r), "up.bias": (d,)}
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise PluginError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected float32 {shape}")
        if not bool(torch.isfinite(t).all()):
            raise PluginError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return pf, tensors


def load_plugin(path: str | os.PathLike, source_hash: str | None = None, num_layers: int | None = None,
                hidden_size: int | None = None) -> CompressionPlugin:
    """Load and validate a plugin; with the model's facts given, refuse a plugin made for another model."""
    pf, tensors = read_plugin_file(path)
    s = pf.spec
    if source_hash is not None and s.source_hash != source_hash:
        raise PluginError(f"{os.fspath(path)}: plugin was trained on checkpoint {s.source_hash or '(unknown)'}, "
                          f"this model is {source_hash or '(unknown)'}; train one with `sparseflash plugins train`")
    if hidden_size is not None and s.hidden_size != hidden_size:
        raise PluginError(f"{os.fspath(path)}: plugin hidden size {s.hidden_size}, model hidden size {hidden_size}")
    if num_layers is not None and s.layer >= num_layers - 1:
        raise PluginError(f"{os.fspath(path)}: plugin sits after layer {s.layer}, the model has {num_layers} "
                          "layers (at least one must follow it)")
    plugin = CompressionPlugin(s, pf.quality, pf.training)
    plugin.load_state_dict(tensors)
    plugin.requires_grad_(False)
    return plugin.eval()


AUTO_MIN_PROMPT = 64  # --compress auto leaves shorter prompts uncompressed (tokens)
AUTO_PPL_BOUND = 0.02  # --compress auto: largest held-out continuation-perplexity rise accepted
# --compress auto: largest perplexity rise on the uncompressed model's own continuations, exp(KL) - 1 with
# KL(uncompressed || compressed) per continuation token. Reference-text perplexity alone cannot guard
# quality: on the bundled model a shorter prompt *lowers* continuation perplexity (docs/plugins.md), so every
# ratio passed the 2% bound; the KL form separates them (ratio 2: 2.8%, 4: 3.7%, 8: 4.6%, keeping only
# the last 16 prompt tokens: 10%).
AUTO_SELF_PPL_BOUND = 0.03
PLUGIN_SUFFIX = ".plugin.safetensors"
PLUGIN_DIR = "plugins"  # plugins beside a layout file, or inside a checkpoint folder


def _stored(plugin: CompressionPlugin, key: str, prompt_tokens: int, missing: float) -> float:
    """A quality figure recorded at training time for the longest measured prompt length <= ``prompt_tokens``
    (``missing`` where none was measured)."""
    values = plugin.quality.get(key, {})
    fits = [(int(n), r) for n, r in values.items() if str(n).isdigit() and int(n) <= prompt_tokens]
    return float(max(fits)[1]) if fits else missing


def stored_ppl_rise(plugin: CompressionPlugin, prompt_tokens: int) -> float:
    """The held-out continuation-perplexity rise recorded at training time for the longest measured
    prompt length <= ``prompt_tokens`` (a fraction; inf where none was measured)."""
    return _stored(plugin, "ppl_rise", prompt_tokens, math.inf)


def stored_self_ppl_rise(plugin: CompressionPlugin, prompt_tokens: int) -> float:
    """exp(KL) - 1 from the KL(uncompressed || compressed) per continuation token recorded at training time
    for the longest measured prompt length <= ``prompt_tokens``: the perplexity rise the plugin causes
    on the uncompressed model's own continuations (inf where none was measured)."""
    return math.expm1(_stored(plugin, "kl", prompt_tokens, math.inf))


def select_plugin(plugins: list[CompressionPlugin], prompt_tokens: int, bound: float = AUTO_PPL_BOUND,
                  min_prompt: int = AUTO_MIN_PROMPT, self_bound: float = AUTO_SELF_PPL_BOUND
                  ) -> CompressionPlugin | None:
    """--compress auto: the largest-ratio plugin whose recorded perplexity rise for this prompt length is
    within ``bound`` on held-out text and within ``self_bound`` on the uncompressed model's own
    continuations (stored KL); None (no compression) for prompts under ``min_prompt`` tokens or no
    such plugin."""
    if prompt_tokens < min_prompt:
        return None
    fit = [p for p in plugins if p.groups(prompt_tokens) > 0 and stored_ppl_rise(p, prompt_tokens) <= bound
           and stored_self_ppl_rise(p, prompt_tokens) <= self_bound]
    return max(fit, key=lambda p: (p.ratio, -stored_ppl_rise(p, prompt_tokens)), default=None)


def plugin_dir(model_path: str | os.PathLike) -> str:
    """Where plugins of ``model_path`` are looked for: ``plugins/`` beside a layout or .gguf file, or
    inside a checkpoint folder."""
    path = os.fspath(model_path)
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(base, PLUGIN_DIR)


def find_plugins(model_path: str | os.PathLike) -> list[str]:
    """Plugin files (``*.plugin.safetensors``) in ``plugin_dir(model_path)``, sorted by name."""
    folder = plugin_dir(model_path)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(PLUGIN_SUFFIX))


def choose_plugin(compress: str | None, plugins: list[CompressionPlugin], prompt_tokens: int,
                  looked_in: str = "") -> CompressionPlugin | None:
    """The plugin a run uses: ``compress`` is None/'none'/'1' (no plugin), 'auto' (``select_plugin``)
    or a ratio (the first plugin of that ratio; an error names what is available)."""
    if compress is None or str(compress).lower() in ("none", "1"):
        return None
    if str(compress).lower() == "auto":
        return select_plugin(plugins, prompt_tokens)
    try:
        ratio = int(compress)
    except ValueError:
        raise PluginError(f"--compress must be a ratio (2, 4, 8, ...), auto or none; got {compress!r}") from None
    if ratio < 1:
        raise PluginError(f"--compress must be a ratio (2, 4, 8, ...), auto or none; got {compress!r}")
    match = [p for p in plugins if p.ratio == ratio]
    if not match:
        have = ", ".join(str(r) for r in sorted({p.ratio for p in plugins})) or "none"
        where = f" in {looked_in}" if looked_in else ""
        raise PluginError(f"--compress {ratio}: no plugin of ratio {ratio}{where} (ratios found: {have}); train one "
                          f"with `sparseflash plugins train --ratio {ratio}` or name it with --plugin")
    return match[0]


def run_plugin_files(compress: str | None, named: list[str] | None,
                     model_paths: list[str | os.PathLike | None]) -> tuple[list[str], str]:
    """(plugin files a run loads, where they were looked for) for ``run --compress``: the ``named``
    files (--plugin), else those in the ``plugins/`` folders of the model paths; none when
    ``compress`` is off. Naming plugins without ``--compress`` is refused."""
    if named and compress is None:
        raise PluginError("--plugin needs --compress K (a ratio) or --compress auto")
    if compress is None or str(compress).lower() in ("none", "1"):
        return [], ""
    if named:
        return list(named), ""
    paths = [p for p in model_paths if p is not None]
    return [f for p in paths for f in find_plugins(p)], " or ".join(plugin_dir(p) for p in paths)


def dense_run_plugin(compress: str | None, named: list[str] | None, model_path: str | os.PathLike | None,
                     num_layers: int, hidden_size: int, prompt_tokens: int) -> CompressionPlugin | None:
    """The plugin a dense run of the checkpoint at ``model_path`` (None: the bundled one) uses for a
    prompt of ``prompt_tokens``, every candidate checked against the checkpoint's hash."""
    from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir

    path = model_path if model_path is not None else default_model_dir()
    files, looked_in = run_plugin_files(compress, named, [path])
    source = checkpoint_hash(path) if files else ""
    plugins = [load_plugin(f, source, num_layers, hidden_size) for f in files]
    return choose_plugin(compress, plugins, prompt_tokens, looked_in)


def compression_note(compression: dict | None, compress: str | None, prompt_tokens: int) -> str | None:
    """The line ``run`` prints about compression (None when there is nothing to say)."""
    if compression is not None:
        c = compression
        return (f"[prompt compressed x{c['ratio']} after layer {c['layer']}: {c['prompt_positions']} -> "
                f"{c['compressed_positions']} positions in later layers]")
    if compress is not None and str(compress).lower() == "auto":
        return f"[--compress auto: no plugin chosen for a {prompt_tokens}-token prompt (rule: docs/plugins.md)]"
    return None
