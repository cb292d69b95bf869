"""The dense reference run one layer at a time over many token windows (as AWQ/GPTQ calibrate).

The hidden states of every window pass through layer l before layer l+1 is read, so one pass reads
each layer's weights once, whatever the number of windows, and holds one layer in the compute dtype
plus the windows' hidden states. Peak memory: one layer + hidden states + a batch's activations.

The arithmetic is the dense reference's own (model/transformer.py: the same norm, RoPE, attention
and FFN calls on the same batch shapes), so a layer-wise pass gives bit for bit the hidden states
that ``Transformer.forward`` gives batch by batch. Only the output head differs in form: it is read
in row blocks and the log-likelihood accumulated with a streaming log-sum-exp, so the whole
float32 head (vocab x d) never sits in memory; perplexities agree with ``perplexity()`` to ~1e-6.

Hidden states are float32, in memory, or in a temporary file (memory-mapped) when they are larger
than ``spill_bytes`` (the OS then pages them to disk under memory pressure).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparseflash.model.ffn import neuron_activations
from sparseflash.model.perplexity import Perplexity, windows
from sparseflash.model.source import CheckpointSource
from sparseflash.model.transformer import Transformer
from sparseflash.model.weights import LayerWeights, ModelWeights

# hook(layer, rows, ffn_input (tokens, d), activations (tokens, neurons)) -> replacement activations or None;
# rows: the token rows of the hidden states this batch covers (windows x ctx, in window order)
LayerHook = Callable[[int, slice, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
HEAD_BLOCK_BYTES = 64 << 20  # float32 bytes of output-head rows read at a time (at 8 windows a batch)
MMAP_THRESHOLD = 1 << 20  # allocations from this size on are mapped, and unmapped when freed (glibc)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make allocations from ``threshold`` bytes on go back to the OS when freed (glibc: a fixed
    mmap threshold), and hand back what the heap holds free now (malloc_trim).

    glibc raises its mmap threshold each time a large mapped block is freed, up to 32 MiB, so after
    a layer's activations are freed the next tensors of a few MiB come from the heap, and what the
    heap once held stays resident: a layer pass's peak grew by 40% that way (predictor training on
    the 1B shape: 495 MiB above the baseline, 340 MiB with this). A no-op (False) where the C
    library has neither mallopt nor malloc_trim."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    return ok


_heap_users = 0  # heap_reuse blocks open now, in any thread
_heap_lock = threading.Lock()


@contextlib.contextmanager
def heap_reuse(threshold: int = 64 << 20):
    """Within the block, allocations below ``threshold`` come from the heap and are reused there
    (a loop that allocates the same few-MiB tensors every step, as training does, pays no page
    faults: mapping them afresh each step made predictor training 45% slower); when the last open
    block (of any thread: trainings may run side by side) is left, the fixed MMAP_THRESHOLD is
    restored and the heap's free memory handed back."""
    global _heap_users
    libc = _libc()
    with _heap_lock:
        _heap_users += 1
        if libc is not None:
            libc.mallopt(-3, int(threshold))
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if libc is not None and _heap_users == 0:
                return_freed_memory()


def head_block_bytes(batch: int) -> int:
    """Float32 bytes of embedding / output-head rows read at a time by a pass of ``batch`` windows a
    batch: HEAD_BLOCK_BYTES at 8 windows, less with smaller batches (their logits shrink alike)."""
    return max(1 << 20, HEAD_BLOCK_BYTES * min(batch, 8) // 8)


class WidenedLayer:
    """A layer's weights held as stored (bf16 / f16 / f32) and widened to float32 each time a field
    is read: the widened copy lives only while the computation that asked for it runs, so a pass
    holds the layer at its stored size plus one widened tensor. Widening is exact, so the results are
    those of a float32 layer."""

    def __init__(self, stored: LayerWeights):
        self._stored = stored

    def __getattr__(self, name: str):
        t = getattr(self._stored, name)
        return t.float() if isinstance(t, torch.Tensor) else t

    def stored(self, name: str) -> torch.Tensor:
        """Field ``name`` as stored (no copy), for code that widens it itself."""
        return getattr(self._stored, name)


class HiddenStates:
    """The residual stream (windows, ctx, d) float32 of a set of windows: in memory, or in a
    temporary memory-mapped file under ``spill_dir`` (removed by ``close``)."""

    def __init__(self, windows_: int, ctx: int, d: int, spill_dir: str | os.PathLike | None = None):
        self.shape = (windows_, ctx, d)
        self.path = None
        if spill_dir is None:
            self.array = np.zeros(self.shape, dtype=np.float32)
        else:
            fd, name = tempfile.mkstemp(prefix="hidden-", suffix=".npy", dir=spill_dir)
            os.close(fd)
            self.path = Path(name)
            self.array = np.lib.format.open_memmap(self.path, "w+", np.float32, self.shape)

    @property
    def windows(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Windows [start, stop) as a float32 tensor (a copy)."""
        return torch.from_numpy(np.array(self.array[start:stop]))

    def put(self, start: int, h: torch.Tensor) -> None:
        self.array[start : start + len(h)] = h.numpy()
        self.flush()

    def flush(self) -> None:
        """Write a spilled stream's changed pages back now: clean pages can be dropped under memory
        pressure, dirty ones cannot (a memory cgroup full of dirty pages is OOM-killed)."""
        if self.path is not None:
            self.array.flush()

    def close(self) -> None:
        self.array = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def nbytes_for(windows_: int, ctx: int, d: int) -> int:
        return windows_ * ctx * d * 4


class LayerwiseModel:
    """A checkpoint source run layer by layer on stored hidden states, in batches of ``batch`` windows."""

    def __init__(self, source: CheckpointSource, batch: int = 8, spill_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None):
        return_freed_memory()
        self.source, self.config, self.batch = source, source.config, batch
        self.spill_bytes, self.spill_dir = spill_bytes, spill_dir
        shell = ModelWeights(torch.empty(0), [], torch.empty(0), None, torch.empty(0))
        self.net = Transformer(self.config, shell, ffn=lambda layer, x: x)
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope(self, ctx: int):
        if ctx not in self._rope_cache:
            self._rope_cache[ctx] = self.net._rope(torch.arange(ctx))
        return self._rope_cache[ctx]

    def new_states(self, windows_: int, ctx: int) -> HiddenStates:
        """Hidden states for ``windows_`` windows, spilled to a file when over ``spill_bytes``."""
        spill = self.spill_bytes is not None and HiddenStates.nbytes_for(windows_, ctx, self.config.hidden_size) > \
            self.spill_bytes
        directory = (self.spill_dir or tempfile.gettempdir()) if spill else None
        return HiddenStates(windows_, ctx, self.config.hidden_size, directory)

    def embed(self, seqs: torch.Tensor, states: HiddenStates | None = None) -> HiddenStates:
        """Embeddings of token windows ``seqs`` (windows, ctx), read from the checkpoint in row blocks."""
        states = states if states is not None else self.new_states(*seqs.shape)
        vocab, d = self.config.vocab_size, self.config.hidden_size
        block = max(1, head_block_bytes(self.batch) // (4 * d))
        used = torch.unique(seqs)
        flat = seqs.reshape(-1)
        rows_out = states.array.reshape(-1, d)  # a view: written in place (memory or file)
        for start in range(0, vocab, block):
            stop = min(vocab, start + block)
            if not bool(((used >= start) & (used < stop)).any()):
                continue
            rows = self.source.rows("embed", start, stop)  # (block, d) float32
            hit = torch.nonzero((flat >= start) & (flat < stop)).squeeze(1)
            rows_out[hit.numpy()] = rows[flat[hit] - start].numpy()
        return states

    def run_layer(self, i: int, w: LayerWeights, states: HiddenStates, hook: LayerHook | None = None,
                  window_ids: np.ndarray | None = None, progress=None) -> None:
        """Every window of ``states`` (or those in ``window_ids``) through layer ``i``, in place."""
        ctx = states.shape[1]
        cos, sin = self._rope(ctx)
        ids = np.arange(states.windows) if window_ids is None else np.asarray(window_ids)
        for k in range(0, len(ids), self.batch):
            chunk = ids[k : k + self.batch]
            contiguous = chunk[-1] - chunk[0] == len(chunk) - 1
            h = states.get(chunk[0], chunk[-1] + 1) if contiguous else torch.from_numpy(states.array[chunk])
            h = self.block(i, w, h, cos, sin, hook, slice(int(chunk[0]) * ctx, (int(chunk[-1]) + 1) * ctx))
            if contiguous:
                states.put(int(chunk[0]), h)
            else:
                states.array[chunk] = h.numpy()
                states.flush()
            if progress is not None:
                progress(len(chunk) * ctx)

    @torch.inference_mode()
    def block(self, i: int, w: LayerWeights, h: torch.Tensor, cos, sin, hook: LayerHook | None = None,
              rows: slice | None = None) -> torch.Tensor:
        """One transformer block on h (batch, ctx, d), exactly as Transformer.forward computes it."""
        c, net = self.config, self.net
        b, t, _ = h.shape
        h = h + net.attention(i, net.norm(h, w.attn_norm_w, w.attn_norm_b), cos, sin, None, 0, w=w)
        x = net.norm(h, w.ffn_norm_w, w.ffn_norm_b).reshape(b * t, -1)
        a = neuron_activations(w, x, c.activation, c.gated)
        if hook is not None:
            replaced = hook(i, rows if rows is not None else slice(0, b * t), x, a)
            if replaced is not None:
                a = replaced
        return h + F.linear(a, w.w_down, w.b_down).reshape(b, t, -1)

    def nll(self, states: HiddenStates, seqs: torch.Tensor) -> tuple[float, int]:
        """(sum of next-token negative log-likelihoods, predicted tokens) of windows ``seqs`` whose
        final hidden states are ``states``; the head is read in row blocks of head_block_bytes(batch)."""
        per_window = self.nll_windows(states, seqs)
        return float(per_window.sum()), seqs.shape[0] * (seqs.shape[1] - 1)

    @torch.inference_mode()
    def nll_windows(self, states: HiddenStates, seqs: torch.Tensor) -> np.ndarray:
        """Each window's summed next-token negative log-likelihood (float64), as ``nll``."""
        c, net = self.config, self.net
        norm_w, norm_b = self.source.final_norm()
        windows_, ctx = seqs.shape
        targets = seqs[:, 1:].reshape(-1)
        lse = torch.full((windows_ * (ctx - 1),), -math.inf, dtype=torch.float64)
        picked = torch.zeros(windows_ * (ctx - 1), dtype=torch.float64)
        block = max(1, head_block_bytes(self.batch) // (4 * c.hidden_size))
        for start in range(0, c.vocab_size, block):
            stop = min(c.vocab_size, start + block)
            head = self.source.rows(self.source.head_name, start, stop)  # (block, d) float32
            for k in range(0, windows_, self.batch):
                h = states.get(k, min(windows_, k + self.batch))[:, :-1]
                z = F.linear(net.norm(h, norm_w, norm_b), head).reshape(-1, stop - start)  # (tokens, block)
                sl = slice(k * (ctx - 1), k * (ctx - 1) + len(z))
                lse[sl] = torch.logaddexp(lse[sl], torch.logsumexp(z, dim=1).double())
                tgt = targets[sl]
                inside = (tgt >= start) & (tgt < stop)
                rows = torch.nonzero(inside).squeeze(1)
                picked[sl][rows] = z[rows, tgt[rows] - start].double()
            del head
        return (lse - picked).view(windows_, ctx - 1).sum(1).numpy()


def perplexity_layerwise(source: CheckpointSource, ids: list[int], ctx: int = 256, max_tokens: int | None = None,
                         batch: int = 8, progress: bool = False, spill_bytes: int | None = 1 << 30) -> Perplexity:
    """Perplexity of ``source`` on ``ids`` in windows of ``ctx`` tokens, reading one layer at a time
    (the same figure as model.perplexity.perplexity, to ~1e-6, without the whole model in memory)."""
    from sparseflash.errors import SparseflashError

    if ctx < 2 or ctx > source.config.max_position_embeddings:
        raise SparseflashError(f"--ctx must be in [2, {source.config.max_position_embeddings}], got {ctx}")
    seqs = windows(ids, ctx, max_tokens)
    model = LayerwiseModel(source, batch, spill_bytes)
    states = model.embed(seqs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=source.config.num_layers, unit="layer", desc="perplexity", leave=False)
    try:
        for i in range(source.config.num_layers):
            model.run_layer(i, source.layer(i), states)
            if bar is not None:
                bar.update(1)
        total, count = model.nll(states, seqs)
    finally:
        states.close()
        if bar is not None:
            bar.close()
    mean = total / count
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(seqs), ctx=ctx)
