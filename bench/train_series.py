"""Train small models from scratch and save Hugging Face checkpoints along the way: the series that
``sparseflash sparsity-trend`` measures (docs/sparsity-trend.md).

    python bench/train_series.py --out /tmp/series --activation relu2   # ReLU² nemotron, 12 checkpoints
    python bench/train_series.py --out /tmp/series --activation silu    # SiLU llama of the same size
    python bench/train_series.py --out /tmp/series --activation relu    # gated ReLU (ReGLU) llama, same size
    python bench/train_series.py --out /tmp/series --width-depth        # 5 ReLU² shapes of one budget
    python bench/train_series.py --out /tmp/series --quick              # a tiny series in seconds (tests)

Checkpoints are saved at log-spaced token counts (``OUT/<series>/tokens-NNNNNNNNNN``; width/depth:
the final checkpoint of each shape, ``OUT/width-depth/L02-d0192``), each a complete checkpoint:
config.json, float32 model.safetensors, the bundled tokenizer.json (vocab 4096) and training.json
(``tokens_trained`` and the run's settings). A dev tool: it needs transformers (the dev extra);
nothing here is part of the package.

Training: plain torch loop, AdamW (betas 0.9/0.95, weight decay 0.1, clip 1.0), a short linear
warmup then a constant learning rate (the paper's stable phase: no decay, so the ratio's trend is
the data's, not the schedule's), windows of ``ctx`` tokens in shuffled order, one pass over the
corpus before any window repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "sparseflash" / "models" / "tiny-relu2"
SHARED_TRAIN = ROOT.parent / "shared" / "corpus" / "pydocs-train.txt.zst"
VOCAB = 4096  # the bundled tokenizer's


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    head_dim: int
    neurons_relu2: int  # FFN neurons of the plain (nemotron) FFN; a gated llama FFN gets 2/3 of them

    def neurons(self, activation: str) -> int:
        if activation == "relu2":
            return self.neurons_relu2
        return int(round(self.neurons_relu2 * 2 / 3 / 8)) * 8  # same FFN parameters with 3 matrices


@dataclass(frozen=True)
class Schedule:
    tokens: int  # training tokens of the series' last checkpoint
    checkpoints: int  # log-spaced, the first at tokens / first_fraction
    first_fraction: float
    ctx: int
    batch: int  # windows per step
    lr: float
    warmup_steps: int


FULL_SHAPE = Shape(layers=4, hidden=128, head_dim=32, neurons_relu2=512)
QUICK_SHAPE = Shape(layers=2, hidden=32, head_dim=16, neurons_relu2=128)
FULL = Schedule(tokens=2_900_000, checkpoints=12, first_fraction=32, ctx=256, batch=8, lr=2e-3, warmup_steps=10)
QUICK = Schedule(tokens=24_576, checkpoints=8, first_fraction=16, ctx=64, batch=4, lr=3e-3, warmup_steps=4)
# width/depth: ~0.8M non-embedding parameters (12 * layers * hidden², FFN 4x hidden) at 5 ratios
WIDTH_DEPTH = [Shape(1, 256, 32, 1024), Shape(2, 192, 32, 768), Shape(4, 128, 32, 512), Shape(8, 96, 32, 384),
               Shape(16, 64, 32, 256)]
QUICK_WIDTH_DEPTH = [Shape(1, 64, 8, 256), Shape(2, 48, 8, 192), Shape(4, 32, 8, 128), Shape(8, 24, 8, 96),
                     Shape(16, 16, 8, 64)]
WIDTH_DEPTH_TOKENS = 600_000


def build_model(shape: Shape, activation: str, ctx: int, seed: int):
    """A randomly initialised transformers model: ReLU² nemotron, SiLU or ReGLU llama, tied embeddings."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.neurons(activation),
                  num_hidden_layers=shape.layers, num_attention_heads=shape.hidden // shape.head_dim,
                  num_key_value_heads=shape.hidden // shape.head_dim, head_dim=shape.head_dim,
                  max_position_embeddings=max(ctx, 128), tie_word_embeddings=True, bos_token_id=0,
                  eos_token_id=0, pad_token_id=None)
    if activation == "relu2":
        config = transformers.NemotronConfig(hidden_act="relu2", partial_rotary_factor=0.5, **common)
    elif activation in ("silu", "relu"):  # relu: a gated ReLU (ReGLU) FFN
        config = transformers.LlamaConfig(hidden_act=activation, **common)
    else:
        raise SystemExit(f"train_series: --activation must be relu2, silu or relu, got {activation!r}")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def corpus_windows(path: Path, ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """The corpus as non-overlapping windows (windows, ctx) of token ids."""
    from sparseflash.model.text import corpus_ids
    from sparseflash.model.tokenizer import TextTokenizer

    ids = corpus_ids(path, TextTokenizer.from_file(BUNDLED / "tokenizer.json"), max_tokens)
    count = len(ids) // ctx
    if count < 2:
        raise SystemExit(f"train_series: {path} has {len(ids)} tokens, too few for windows of {ctx}")
    return torch.tensor(ids[: count * ctx], dtype=torch.long).view(count, ctx)


def save_checkpoint(model, folder: Path, record: dict) -> None:
    """save_pretrained + tokenizer.json + training.json, written to a temp folder and renamed into place."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(BUNDLED / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def checkpoint_steps(s: Schedule) -> list[int]:
    """Steps at which to save: log-spaced token counts from tokens / first_fraction to tokens, distinct."""
    step_tokens = s.ctx * s.batch
    targets = np.geomspace(s.tokens / s.first_fraction, s.tokens, s.checkpoints)
    steps = sorted({max(1, int(round(t / step_tokens))) for t in targets})
    if len(steps) < s.checkpoints:
        raise SystemExit(f"train_series: {s.checkpoints} checkpoints do not fit in {s.tokens} tokens")
    return steps


def train(shape: Shape, activation: str, s: Schedule, windows: torch.Tensor, out: Path, save_steps: list[int],
          seed: int = 0, quiet: bool = False, extra: dict | None = None) -> list[Path]:
    """Train one model; save a checkpoint at each of ``save_steps``. Returns the checkpoint folders."""
    from tqdm import tqdm

    model = build_model(shape, activation, s.ctx, seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=gen)
    cursor, epoch, losses, saved = 0, 0, [], []
    t0 = time.perf_counter()
    bar = tqdm(total=save_steps[-1], desc=f"{activation} {shape.layers}x{shape.hidden}", disable=quiet, leave=False)
    for step in range(1, save_steps[-1] + 1):
        if cursor + s.batch > len(order):  # next pass over the corpus, in a new order
            order, cursor, epoch = torch.randperm(len(windows), generator=gen), 0, epoch + 1
        batch = windows[order[cursor : cursor + s.batch]]
        cursor += s.batch
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, step / s.warmup_steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step in save_steps:
            tokens = step * s.ctx * s.batch
            record = {"tokens_trained": tokens, "steps": step, "activation": activation, "shape": asdict(shape),
                      "ffn_neurons": shape.neurons(activation), "schedule": asdict(s), "seed": seed,
                      "epochs_started": epoch + 1, "train_loss": float(np.mean(losses[-20:])),
                      "seconds": time.perf_counter() - t0, **(extra or {})}
            folder = out / f"tokens-{tokens:010d}"
            save_checkpoint(model.eval(), folder, record)
            model.train()
            saved.append(folder)
    bar.close()
    return saved


def train_series(out: str | os.PathLike, activation: str = "relu2", quick: bool = False, width_depth: bool = False,
                 corpus: str | os.PathLike | None = None, tokens: int | None = None, seed: int = 0,
                 quiet: bool = False) -> list[Path]:
    """Train a series into ``out`` and return its checkpoint folders in order (see the module docstring)."""
    sched = QUICK if quick else FULL
    if tokens is not None:
        sched = Schedule(**{**asdict(sched), "tokens": tokens})
    elif width_depth:
        sched = Schedule(**{**asdict(sched), "tokens": QUICK.tokens if quick else WIDTH_DEPTH_TOKENS})
    if corpus is None:
        corpus = BUNDLED / "calibration.txt.zst" if quick else SHARED_TRAIN
    corpus = Path(corpus)
    # tokenise only what training reads (quick: the whole small text; full: the whole corpus, one pass)
    windows = corpus_windows(corpus, sched.ctx, None)
    prefix = "quick-" if quick else ""
    extra = {"corpus": str(corpus), "corpus_tokens": windows.numel()}
    if width_depth:
        base = Path(out) / f"{prefix}width-depth"
        folders = []
        for shape in QUICK_WIDTH_DEPTH if quick else WIDTH_DEPTH:
            steps = [max(1, sched.tokens // (sched.ctx * sched.batch))]
            base.mkdir(parents=True, exist_ok=True)
            (last,) = train(shape, "relu2", sched, windows, base, steps, seed, quiet, extra)
            folder = base / f"L{shape.layers:02d}-d{shape.hidden:04d}"
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(last, folder)
            folders.append(folder)
        return folders
    series = Path(out) / f"{prefix}{activation}"
    series.mkdir(parents=True, exist_ok=True)
    return train(QUICK_SHAPE if quick else FULL_SHAPE, activation, sched, windows, series,
                 checkpoint_steps(sched), seed, quiet, extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (series go in subfolders)")
    ap.add_argument("--activation", choices=("relu2", "silu", "relu"), default="relu2")
    ap.add_argument("--width-depth", action="store_true", help="ReLU² models of one budget at several width/depth ratios")
    ap.add_argument("--quick", action="store_true", help="a tiny series on the bundled calibration text (seconds)")
    ap.add_argument("--corpus", default=None, help=f"training text (default: {SHARED_TRAIN}; --quick: the bundled one)")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens of the last checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machines are shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from sparseflash.errors import SparseflashError

    try:
        folders = train_series(args.out, args.activation, args.quick, args.width_depth, args.corpus, args.tokens,
                               args.seed)
    except SparseflashError as e:
        print(f"train_series: error: {e}", file=sys.stderr)
        return 2
    for f in folders:
        print(f)
    print(f"{len(folders)} checkpoints in {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
