"""Train a compression plugin (model/plugin.py) with the model frozen.

The loss distils the uncompressed model: for a window of prompt + continuation tokens, the teacher
is the plain forward pass; the student runs the same window with the prompt compressed after the
plugin's layer (the continuation stays uncompressed, as at run time). The loss is
KL(teacher || student) of the next-token distributions that predict the continuation tokens. Only
the plugin's parameters get gradients; autograd passes through the frozen layers after it.

A held-out share of the corpus (its end) is never trained on: it gives the validation KL and the
continuation-perplexity rise at a few prompt lengths, which are stored in the plugin file and used
by ``--compress auto``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sparseflash.errors import SparseflashError
from sparseflash.layout.params import PluginTrainParams
from sparseflash.model.generate import continuation_logits
from sparseflash.model.plugin import CompressionPlugin, PluginSpec
from sparseflash.model.transformer import Transformer


@dataclass(frozen=True)
class ContinuationScore:
    """Quality of continuations after a (compressed or plain) prompt, over ``windows`` windows."""

    nll: float  # mean negative log-likelihood per continuation token (nats)
    tokens: int
    windows: int
    argmax: torch.Tensor  # (windows, continuation) greedy next-token ids under teacher forcing
    kl: float | None = None  # mean KL(reference || this) per continuation token (nats), if a reference was given
    logprobs: torch.Tensor | None = None  # (windows, continuation, vocab), if asked for

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def split_heldout(ids: list[int], share: float) -> tuple[list[int], list[int]]:
    """(train ids, held-out ids): the held-out part is the last ``share`` of the stream."""
    cut = int(len(ids) * (1 - share))
    return ids[:cut], ids[cut:]


def eval_windows(ids: list[int], length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (windows, length) from the start of ``ids``."""
    n = len(ids) // length if count is None else min(count, len(ids) // length)
    if n == 0:
        raise SparseflashError(f"need at least {length} tokens of text for one window, got {len(ids)}")
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def continuation_score(model: Transformer, seqs: torch.Tensor, prompt_tokens: int,
                       plugin: CompressionPlugin | None = None, batch: int = 8, reference: torch.Tensor | None = None,
                       keep_logprobs: bool = False) -> ContinuationScore:
    """NLL of the tokens after ``prompt_tokens`` in each window (windows, tokens), prefilled with the
    plugin if given, the continuation fed through the KV cache; ``reference``: log-probabilities of
    another run (``keep_logprobs``) to measure the KL from."""
    total, count, kl, argmax, kept = 0.0, 0, 0.0, [], []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        logp = F.log_softmax(continuation_logits(model, chunk, prompt_tokens, plugin)[0], -1)
        target = chunk[:, prompt_tokens:]
        total -= float(logp.gather(-1, target[..., None]).sum())
        count += target.numel()
        argmax.append(logp.argmax(-1))
        if reference is not None:
            ref = reference[i : i + batch]
            kl += float((ref.exp() * (ref - logp)).sum())
        if keep_logprobs:
            kept.append(logp)
    return ContinuationScore(total / count, count, len(seqs), torch.cat(argmax),
                             None if reference is None else kl / count, torch.cat(kept) if keep_logprobs else None)


def teacher_logprobs(model: Transformer, seqs: torch.Tensor, prompt: int) -> torch.Tensor:
    """The uncompressed model's log-probabilities (windows, continuation, vocab) of the distributions
    that predict each continuation token of ``seqs`` (windows, prompt + continuation)."""
    rows = seqs.shape[1] - prompt + 1  # the last prompt position and the continuation's, less the final one
    with torch.no_grad():
        return F.log_softmax(model.differentiable_forward(seqs, keep_last=rows)[:, :-1], -1)


def distill_loss(model: Transformer, plugin: CompressionPlugin, seqs: torch.Tensor, prompt: int,
                 teacher: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per continuation token, for windows (batch, prompt + continuation);
    ``teacher``: ``teacher_logprobs`` of the windows, computed here if not given."""
    teacher = teacher_logprobs(model, seqs, prompt) if teacher is None else teacher.float()
    rows = teacher.shape[1] + 1
    student = model.differentiable_forward(seqs, plugin=plugin, groups=plugin.groups(prompt), keep_last=rows)[:, :-1]
    vocab = teacher.shape[-1]
    return F.kl_div(F.log_softmax(student.reshape(-1, vocab), -1), teacher.reshape(-1, vocab),
                    log_target=True, reduction="batchmean")


@dataclass
class TeacherPool:
    """Training windows in buckets of equal prompt length, with their teacher log-probabilities
    (float16: 0.5 MiB per window of 64 continuation tokens over a 4096-token vocabulary)."""

    prompts: list[int]
    seqs: list[torch.Tensor]  # per bucket (windows, prompt + continuation)
    teacher: list[torch.Tensor]  # per bucket (windows, continuation, vocab)


def teacher_pool(model: Transformer, train: torch.Tensor, p: PluginTrainParams, gen: torch.Generator,
                 bar=None) -> TeacherPool:
    """Draw ``p.pool_windows`` windows at random offsets of ``train`` (ids), spread over the prompt
    buckets, and run the uncompressed model on them once."""
    prompts = sorted({int(x) for x in torch.linspace(p.min_prompt_tokens, p.prompt_tokens, p.prompt_buckets).round()})
    pool = TeacherPool(prompts, [], [])
    for b, prompt in enumerate(prompts):
        count = len(range(b, p.pool_windows, len(prompts)))
        length = prompt + p.continuation_tokens
        starts = torch.randint(0, len(train) - length + 1, (count,), generator=gen).tolist()
        seqs = torch.stack([train[s : s + length] for s in starts])  # (windows, length)
        pool.seqs.append(seqs)
        pool.teacher.append(torch.cat([teacher_logprobs(model, seqs[i : i + p.batch], prompt).half()
                                       for i in range(0, count, p.batch)]))
        if bar is not None:
            bar.update(count)
    return pool


def heldout_quality(model: Transformer, plugin: CompressionPlugin, heldout: list[int],
                    p: PluginTrainParams) -> dict:
    """Continuation perplexity with and without the plugin at each of ``p.quality_prompts``, and the
    share of continuation positions whose teacher-forced top-1 token equals the uncompressed run's, and
    the mean KL(uncompressed || compressed) per continuation token (nats)."""
    out = {"continuation_tokens": p.continuation_tokens, "ppl": {}, "ppl_plain": {}, "ppl_rise": {}, "top1": {},
           "kl": {}, "windows": {}}
    for prompt in p.quality_prompts:
        fits = prompt + p.continuation_tokens <= model.config.max_position_embeddings
        if not fits or len(heldout) < prompt + p.continuation_tokens or plugin.groups(prompt) == 0:
            continue
        seqs = eval_windows(heldout, prompt + p.continuation_tokens, p.quality_windows)
        plain = continuation_score(model, seqs, prompt, keep_logprobs=True)
        packed = continuation_score(model, seqs, prompt, plugin, reference=plain.logprobs)
        out["ppl"][str(prompt)] = packed.ppl
        out["ppl_plain"][str(prompt)] = plain.ppl
        out["ppl_rise"][str(prompt)] = packed.ppl / plain.ppl - 1
        out["top1"][str(prompt)] = float((packed.argmax == plain.argmax).float().mean())
        out["kl"][str(prompt)] = packed.kl
        out["windows"][str(prompt)] = len(seqs)
    return out


def _validation_kl(model, plugin, heldout, p) -> float:
    seqs = eval_windows(heldout, p.prompt_tokens + p.continuation_tokens, p.quality_windows)
    with torch.no_grad():
        return float(sum(distill_loss(model, plugin, seqs[i : i + p.batch], p.prompt_tokens) * len(seqs[i : i + p.batch])
                         for i in range(0, len(seqs), p.batch)) / len(seqs))


def train_plugin(model: Transformer, ids: list[int], p: PluginTrainParams, source_hash: str,
                 quiet: bool = False) -> CompressionPlugin:
    """Train a plugin of ``p.ratio`` after layer ``p.layer`` on token ids of a corpus; returns it with
    its held-out quality and training record attached (``save_plugin`` writes both)."""
    c = model.config
    if not 0 <= p.layer < c.num_layers - 1:
        raise SparseflashError(f"--layer must be in [0, {c.num_layers - 2}] (at least one layer after the plugin)")
    window = p.prompt_tokens + p.continuation_tokens
    if window > c.max_position_embeddings:
        raise SparseflashError(f"prompt {p.prompt_tokens} + continuation {p.continuation_tokens} tokens exceed the "
                               f"model's context of {c.max_position_embeddings}")
    if not p.ratio + p.tail <= p.min_prompt_tokens <= p.prompt_tokens:
        raise SparseflashError(f"prompt lengths [{p.min_prompt_tokens}, {p.prompt_tokens}] leave no group of "
                               f"{p.ratio} beside the {p.tail}-token tail")
    train, heldout = split_heldout(ids, p.heldout_share)
    if len(train) < 2 * window or len(heldout) < window:
        raise SparseflashError(f"corpus too small: {len(ids)} tokens; need about {int(2 * window / (1 - p.heldout_share))}"
                               f" ({window}-token windows, {p.heldout_share:.0%} held out)")
    torch.manual_seed(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    spec = PluginSpec(p.ratio, p.layer, c.hidden_size, p.tail, p.rank, p.rope, source_hash)
    plugin = CompressionPlugin(spec).to(model.device)
    train_ids = torch.tensor(train, dtype=torch.long)
    opt = torch.optim.AdamW(plugin.parameters(), lr=p.lr, weight_decay=0.0)
    warm = max(1, p.steps // 10)  # linear warm-up, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, p.steps - warm))))
    t0 = time.perf_counter()
    val_before = _validation_kl(model, plugin, heldout, p)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=p.pool_windows, unit="window", desc="teacher distributions", leave=False)
    pool = teacher_pool(model, train_ids, p, gen, bar)
    if bar is not None:
        bar.close()
        bar = tqdm(total=p.steps, unit="step", desc=f"plugin x{p.ratio} after layer {p.layer}", leave=False)
    losses = []
    sizes = torch.tensor([len(x) for x in pool.seqs], dtype=torch.float)
    for _ in range(p.steps):
        b = int(torch.multinomial(sizes, 1, generator=gen))
        pick = torch.randperm(len(pool.seqs[b]), generator=gen)[: p.batch]
        loss = distill_loss(model, plugin, pool.seqs[b][pick], pool.prompts[b], pool.teacher[b][pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plugin.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    if bar is not None:
        bar.close()
    plugin.eval().requires_grad_(False)
    val_after = _validation_kl(model, plugin, heldout, p)
    plugin.quality = {"heldout_tokens": len(heldout), **heldout_quality(model, plugin, heldout, p)}
    plugin.training_record = {
        **{k: v for k, v in asdict(p).items() if k not in ("ratio", "layer", "tail", "rank", "rope")},
        "train_tokens": len(train), "final_train_kl": sum(losses[-10:]) / len(losses[-10:]),
        "val_kl_initial": val_before, "val_kl": val_after, "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    return plugin


@dataclass
class ReferenceModel:
    """A dense model to train or measure plugins on, with its source checkpoint hash."""

    transformer: Transformer
    tokenizer: object
    source_hash: str
    parameters: int  # the model's parameter count (tied head counted once)
    layout_path: str | None = None  # set when the model was opened from a layout (eval/plugins_eval.py)
    close: object = None  # callable that releases a layout's file, or None

    def load_plugins(self, paths) -> list[CompressionPlugin]:
        from sparseflash.model.plugin import load_plugin

        c = self.transformer.config
        return [load_plugin(p, self.source_hash, c.num_layers, c.hidden_size) for p in paths]


def open_reference(model_path) -> ReferenceModel:
    """Open the checkpoint ``model_path`` (a folder or .gguf; None: the bundled model) densely, with
    its content hash. Plugins are trained on the checkpoint: a layout made from it records the same
    hash, so the plugin fits the layout too."""
    from sparseflash.model.checkpoint import checkpoint_hash, default_model_dir
    from sparseflash.model.loader import open_dense

    if model_path is not None and str(model_path).endswith(".sflash"):
        raise SparseflashError(f"{model_path}: plugins are trained on the checkpoint the layout was made from "
                               "(-m its folder or .gguf); the plugin then fits the layout as well")
    model = open_dense(model_path)
    return ReferenceModel(model.transformer(), model.tokenizer, checkpoint_hash(model_path or default_model_dir()),
                          model.weights.parameter_count())


def train_plugin_file(model_path, corpus, p: PluginTrainParams, out, quiet: bool = False) -> CompressionPlugin:
    """``sparseflash plugins train``: open the model, read the corpus, train, write ``out``."""
    from sparseflash.model.plugin import save_plugin
    from sparseflash.model.text import corpus_ids

    ref = open_reference(model_path)
    plugin = train_plugin(ref.transformer, corpus_ids(corpus, ref.tokenizer), p, ref.source_hash, quiet)
    save_plugin(plugin, out)
    return plugin
