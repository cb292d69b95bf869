"""The streaming FFN: per token and layer, predict -> look up the cache -> read what is missing ->
run the sparse kernel over cached slots. Attention, embeddings and norms stay resident.

``StreamingFFN`` plugs into model.transformer.Transformer as its FFN, so generation, perplexity and
teacher forcing run unchanged on top of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sparseflash.errors import SparseflashError
from sparseflash.runtime.cache import NeuronCache
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import LayoutModel
from sparseflash.runtime.policy import Policy
from sparseflash.runtime.predict import load_predictors
from sparseflash.runtime.streamer import BundleReader, ReadResult

STORAGE_NP = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
INDEX_BYTES_PER_NEURON = 8  # slot_of (int64)
INDEX_BYTES_PER_SLOT = 8 * 3 + 1 + 4 + 8  # position_of, last_use, uses, pinned, score (f32), down norm (f64)
STAGING_BUFFERS = 3  # --device cuda: one for the look-ahead prefetch, two to pipeline demand reads


def staging_nbytes(rows: int, bundle_bytes: int) -> int:
    """--device cuda: bytes of the staging ring (pinned host rows + slot ids, and their device copies)."""
    return 2 * STAGING_BUFFERS * rows * (bundle_bytes + 8)


class BudgetError(SparseflashError):
    """The memory budget cannot hold what the engine needs."""


@dataclass
class TokenStats:
    """What one forward step (a token, or a prompt for prefill) cost."""

    tokens: int = 0
    predicted: int = 0  # neurons computed, summed over layers
    needed: int = 0  # of those, truly active (magnitude >= threshold)
    hits: int = 0  # predicted neurons found in the cache (hot region included)
    misses: int = 0
    bytes_read: int = 0
    requests: int = 0
    io_wait_s: float = 0.0
    predictor_s: float = 0.0
    ffn_s: float = 0.0
    attention_s: float = 0.0
    per_layer_predicted: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the engine holds, by kind; ``total`` never exceeds the budget."""

    resident: int
    predictors: int
    hot: int
    cache: int
    index: int
    io_buffers: int
    slots_per_layer: int
    minimum: int  # the smallest budget that can work
    budget: int  # the budget in force (bytes)

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.hot + self.cache + self.index + self.io_buffers


def plan_memory(lm: LayoutModel, policy: Policy, predictor_bytes: int, io_buffer_total: int,
                extra_resident: int = 0) -> MemoryPlan:
    """Split the budget: resident tensors, predictors, hot region, I/O buffers, then neuron cache slots.
    ``extra_resident``: bytes held beside the layout's tensors (compression plugins), counted as resident."""
    regions = lm.file.layers
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in lm.weights.named().values()}.values())
    resident += extra_resident  # compression plugins (model/plugin.py)
    bb = regions[0].bundle_bytes
    n = regions[0].n_neurons
    layers = len(regions)
    hot = sum(r.n_hot for r in regions) * bb
    per_slot = bb + INDEX_BYTES_PER_SLOT
    index = layers * n * INDEX_BYTES_PER_NEURON + sum(r.n_hot for r in regions) * INDEX_BYTES_PER_SLOT
    fixed = resident + predictor_bytes + hot + index + io_buffer_total
    max_extra = n - min(r.n_hot for r in regions)
    minimum = fixed + layers * min(policy.min_slots, max_extra) * per_slot
    budget = policy.budget_bytes
    if policy.ffn_share is not None:  # hot region + cache = share of the FFN bytes
        budget = fixed - hot + int(policy.ffn_share * layers * n * bb * per_slot / bb)
    if budget < minimum:
        what = (f"FFN share {policy.ffn_share:.0%} gives {budget} bytes" if policy.ffn_share is not None
                else f"budget {budget} bytes")
        raise BudgetError(f"{what}, below the minimum of {minimum} bytes "
                          f"({minimum / 2**20:.1f} MiB: resident {resident}, hot region {hot}, I/O buffers "
                          f"{io_buffer_total}, {policy.min_slots} cache slots/layer)")
    extra = min(max_extra, (budget - fixed) // (layers * per_slot))
    return MemoryPlan(resident, predictor_bytes, hot, layers * extra * bb, index + layers * extra * INDEX_BYTES_PER_SLOT,
                      io_buffer_total, int(extra), minimum, budget)


class StreamingFFN:
    """FFN callable (layer, x) -> y that streams bundles under the policy's budget."""

    def __init__(self, lm: LayoutModel, policy: Policy, device: DeviceModel | None = None, backend: str = "cpu",
                 reader_factory=BundleReader, extra_resident_bytes: int = 0):
        from sparseflash.kernels import get_backend

        self.lm, self.policy = lm, policy
        c = lm.config
        self.config = c
        self.regions = lm.file.layers
        if any(r.compressed for r in self.regions):
            raise SparseflashError(f"{lm.path}: FFN regions are zstd-compressed; streaming needs an uncompressed "
                                   "layout (rebuild without --zstd)")
        self.strategy, self.predictors, self.lookahead = load_predictors(lm.file, lm.header, c.num_layers,
                                                                         policy.strategy)
        if not policy.lookahead:
            self.lookahead = {}
        pred_bytes = sum(p.nbytes for p in self.predictors.values()) + sum(p.nbytes for p in self.lookahead.values())
        self.reader = reader_factory(lm.path, list(self.regions), device or DeviceModel(), policy.io,
                                     policy.io_threads, policy.io_buffer_bytes)
        on_gpu = policy.device == "cuda"
        r0 = self.regions[0]
        staging_rows, staging = 0, 0
        if on_gpu:  # pinned host + device staging ring, both counted as I/O buffers
            staging_rows = int(np.clip(2 * policy.io_buffer_bytes // r0.bundle_bytes, 16, r0.n_neurons))
            staging = staging_nbytes(staging_rows, r0.bundle_bytes)
        try:
            self.memory = plan_memory(lm, policy, pred_bytes, self.reader.buffer_total_bytes + staging,
                                      extra_resident_bytes)  # compression plugins' bytes
        except BudgetError:
            self.reader.close()
            raise
        if on_gpu:
            backend = "cuda"
        try:
            self.kernel = get_backend(backend)
        except Exception as e:  # BackendUnavailableError: no GPU and no simulator
            self.reader.close()
            raise SparseflashError(f"--device {policy.device}: {e}") from None
        self.kind = c.ffn_kind
        self.storage = r0.dtype
        if backend == "cpu":
            self.kernel.warmup((self.storage,))  # compile (or load) before the first token, not during it
        self.caches = []
        for r in self.regions:
            cache = NeuronCache(r.n_neurons, r.n_hot + self.memory.slots_per_layer, r.bundle_len,
                                STORAGE_NP[r.dtype], policy.window, policy.eviction, host_slots=not on_gpu)
            cache.down_norm = np.zeros(cache.capacity)
            self.caches.append(cache)
        # per-neuron biases are gathered by slot on the host; take them before weights move
        self.b_up = [None if w.b_up is None else w.b_up.float().numpy() for w in lm.weights.layers]
        self.b_gate = [None if w.b_gate is None else w.b_gate.float().numpy() for w in lm.weights.layers]
        self.gpu = None
        self.device_bytes_before = None  # device memory in use before the engine allocated any (real GPU)
        if on_gpu:  # bundles live in device memory; resident tensors move to torch's GPU if it has one
            from sparseflash.runtime.gpu import DeviceCache, device_bytes_in_use, torch_device

            self.device_bytes_before = device_bytes_in_use()
            self.gpu = DeviceCache([cache.capacity for cache in self.caches], r0.bundle_len, STORAGE_NP[self.storage],
                                   staging_rows, STAGING_BUFFERS)
            target = torch_device()
            lm.weights = lm.weights.to(target)
            for p in (*self.predictors.values(), *self.lookahead.values()):
                p.to(target)
        self.b_down = [w.b_down for w in lm.weights.layers]
        self.stats: list[TokenStats] = []
        self._current: TokenStats | None = None
        self._pending: dict[int, tuple] = {}
        self._last_t = time.perf_counter()
        self.trace: list[list[np.ndarray]] | None = None  # set to [[] per layer] to record predicted sets
        self._load_hot()

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    # -- set-up -------------------------------------------------------------------------------------
    def _load_hot(self) -> None:
        for l, r in enumerate(self.regions):
            if r.n_hot:
                slots = self.caches[l].reserve(r.n_hot)
                self._fill(l, np.arange(r.n_hot), slots, pinned=True)

    def _fill(self, l: int, positions: np.ndarray, slots: np.ndarray, pinned: bool = False) -> ReadResult:
        """Read positions into reserved slots, then commit them (on failure the slots are released)."""
        cache = self.caches[l]
        if self.gpu is not None:
            return self._fill_gpu(l, positions, slots, pinned)
        try:
            res = self.reader.submit(l, positions, cache.slots, slots).result()
        except BaseException:
            cache.release(slots)
            raise
        self._commit(l, slots, positions, pinned)
        return res

    def _fill_gpu(self, l: int, positions: np.ndarray, slots: np.ndarray, pinned: bool) -> ReadResult:
        """Read in staging-buffer-sized chunks, two in flight: while one chunk's rows are copied up
        (asynchronously, on the copy stream) the next one is read from disk."""
        gpu, total = self.gpu, ReadResult()
        step = gpu.staging_rows
        inflight: list = []
        committed = 0

        def finish_oldest():
            nonlocal committed
            future, buf, a, b = inflight.pop(0)
            try:
                res = future.result()
            except BaseException:
                gpu.release(buf)
                raise
            self._commit(l, slots[a:b], positions[a:b], pinned, (buf, b - a))
            committed = b
            total.requests += res.requests
            total.bytes += res.bytes

        try:
            for a in range(0, len(positions), step):
                b = min(a + step, len(positions))
                while inflight and (len(inflight) >= 2 or not gpu.free_buffers()):
                    finish_oldest()
                buf = gpu.acquire()
                try:
                    future = self.reader.submit(l, positions[a:b], buf.host, np.arange(b - a))
                except BaseException:
                    gpu.release(buf)
                    raise
                inflight.append((future, buf, a, b))
            while inflight:
                finish_oldest()
        except BaseException:
            for future, buf, _, _ in inflight:  # let the other reads end before their buffers are reused
                try:
                    future.result()
                except Exception:
                    pass
                gpu.release(buf)
            self.caches[l].release(slots[committed:])
            raise
        return total

    def _commit(self, l, slots, positions, pinned=False, staged=None):
        """Mark slots as holding positions and record their down-column norms; on the GPU, first
        queue the upload of the staged rows (``staged`` = (buffer, rows)) and free the buffer."""
        cache = self.caches[l]
        if staged is not None:
            buf, n = staged
            self.gpu.upload(l, buf, n, slots)
            rows, picks = buf.host, np.arange(n)
        else:
            rows, picks = cache.slots, np.asarray(slots)
        cache.commit(slots, positions, pinned)
        d = self.config.hidden_size
        block = max(1, (1 << 20) // (4 * d))  # widen at most ~1 MiB of down columns at a time
        for i in range(0, len(picks), block):
            down = rows[picks[i : i + block], -d:]
            if self.storage == "bf16":
                down = (down.astype(np.uint32) << 16).view(np.float32)
            cache.down_norm[slots[i : i + block]] = np.linalg.norm(down.astype(np.float32), axis=1)
        if staged is not None:
            self.gpu.release(staged[0])  # reusable once its upload has read it (the buffer's event)

    # -- per call -----------------------------------------------------------------------------------
    def begin_token(self, tokens: int) -> TokenStats:
        s = TokenStats(tokens=tokens)
        self.stats.append(s)
        self._current = s
        for l, cache in enumerate(self.caches):
            cache.tick()
            if not self.policy.reuse and l not in self._pending:
                held = np.nonzero((cache.position_of >= 0) & ~cache.pinned)[0]
                cache.evict(held)
        return s

    def _predict(self, l: int, x: torch.Tensor) -> np.ndarray:
        if self.strategy == "all":
            return np.arange(self.regions[l].n_neurons)
        if self.policy.eviction == "predicted":  # the logits also rank the cached neurons for eviction
            positions, scores = self.predictors[l].predict(x, self.strategy, self.policy.margin, scores=True)
            self.caches[l].note_scores(scores)
            return positions
        return self.predictors[l].predict(x, self.strategy, self.policy.margin)

    def _prefetch_next(self, l: int, x: torch.Tensor) -> None:
        """Start reading layer l+1's look-ahead-predicted bundles while layer l computes."""
        nxt = l + 1
        ahead = self.lookahead.get(nxt)
        if ahead is None or nxt in self._pending:
            return
        positions = ahead.predict(x, self.strategy, self.policy.margin)
        cache = self.caches[nxt]
        missing = positions[cache.lookup(positions) < 0]
        room = cache.free_count() + len(cache.evictable())
        limit = room - self.policy.min_slots
        if self.gpu is not None:  # one staging buffer, taken only when a demand read would still have two
            if self.gpu.free_buffers() < STAGING_BUFFERS:
                return
            limit = min(limit, self.gpu.staging_rows)
        missing = missing[: max(0, min(len(missing), limit))]
        if len(missing) == 0:
            return
        slots = cache.reserve(len(missing))
        if self.gpu is None:
            self._pending[nxt] = (self.reader.submit(nxt, missing, cache.slots, slots), slots, missing, None)
            return
        buf = self.gpu.acquire()
        try:
            future = self.reader.submit(nxt, missing, buf.host, np.arange(len(missing)))
        except BaseException:
            self.gpu.release(buf)
            cache.release(slots)
            raise
        self._pending[nxt] = (future, slots, missing, buf)

    def _settle_prefetch(self, l: int, s: TokenStats) -> None:
        pending = self._pending.pop(l, None)
        if pending is None:
            return
        future, slots, positions, buf = pending
        t = time.perf_counter()
        try:
            res = future.result()
        except BaseException:
            self.caches[l].release(slots)
            if buf is not None:
                self.gpu.release(buf)
            raise
        s.io_wait_s += time.perf_counter() - t
        s.bytes_read += res.bytes
        s.requests += res.requests
        self._commit(l, slots, positions, staged=None if buf is None else (buf, len(positions)))

    def _compute(self, l, x, slots, y, s):
        """y += the FFN over the neurons in ``slots`` (y: torch, on x's device)."""
        if len(slots) == 0:
            return
        cache = self.caches[l]
        acts = np.empty((x.shape[0], len(slots)), dtype=np.float32)
        gate_b = self.b_gate[l][cache.position_of] if self.b_gate[l] is not None else None
        up_b = self.b_up[l][cache.position_of] if self.b_up[l] is not None else None
        if self.gpu is None:
            part = self.kernel.sparse_ffn(np.ascontiguousarray(x.numpy()), cache.slots, slots, self.kind,
                                          storage=self.storage, gate_bias=gate_b, up_bias=up_b, activations_out=acts)
            y += torch.from_numpy(part)
        else:
            from sparseflash.runtime.gpu import as_device_array

            gpu = self.gpu
            gpu.before_compute(l)  # the layer's uploads so far land before the kernel reads its slots
            out = torch.empty(y.shape, dtype=torch.float32, device=y.device)
            self.kernel.sparse_ffn(as_device_array(x), gpu.slots[l], slots, self.kind, storage=self.storage,
                                   gate_bias=gate_b, up_bias=up_b, out=as_device_array(out) if out.is_cuda else
                                   out.numpy(), activations_out=acts, stream=gpu.compute_stream)
            gpu.after_compute(l)
            y += out
        mag = np.abs(acts) * cache.down_norm[slots][None, :]
        s.needed += int((mag >= self.regions[l].threshold).any(axis=0).sum())

    def __call__(self, l: int, x: torch.Tensor) -> torch.Tensor:
        t_start = time.perf_counter()
        if l == 0:
            s = self.begin_token(x.shape[0])
        s = self._current
        s.attention_s += t_start - self._last_t
        cache = self.caches[l]
        self._settle_prefetch(l, s)

        t = time.perf_counter()
        positions = self._predict(l, x)
        s.predictor_s += time.perf_counter() - t
        s.predicted += len(positions)
        s.per_layer_predicted.append(len(positions))
        if self.trace is not None:
            self.trace[l].append(positions)
        if l + 1 < self.config.num_layers:
            t = time.perf_counter()
            self._prefetch_next(l, x)
            s.predictor_s += time.perf_counter() - t

        slots = cache.lookup(positions)
        hit = slots >= 0
        s.hits += int(hit.sum())
        missing = positions[~hit]
        s.misses += len(missing)
        x = x.float().contiguous()
        y = torch.zeros((x.shape[0], self.config.hidden_size), dtype=torch.float32, device=x.device)
        hit_slots = slots[hit]
        cache.touch(hit_slots)
        room = cache.free_count() + len(cache.evictable(protect=hit_slots))
        if len(missing) <= room:  # the usual case: read what is missing, compute everything at once
            new = cache.reserve(len(missing), protect=hit_slots)
            self._read(l, missing, new, s)
            cache.touch(new)
            t = time.perf_counter()
            self._compute(l, x, np.concatenate([hit_slots, new]), y, s)
            s.ffn_s += time.perf_counter() - t
        else:  # more neurons than the cache can hold: accumulate the output over batches
            t = time.perf_counter()
            self._compute(l, x, hit_slots, y, s)
            s.ffn_s += time.perf_counter() - t
            unpinned = int((~cache.pinned).sum())
            for i in range(0, len(missing), unpinned):
                part = missing[i : i + unpinned]
                victims = np.nonzero((cache.position_of >= 0) & ~cache.pinned)[0]
                need = len(part) - cache.free_count()
                if need > 0:
                    cache.evict(victims[np.argsort(cache.last_use[victims], kind="stable")][:need])
                new = cache.reserve(len(part))
                self._read(l, part, new, s)
                cache.touch(new)
                t = time.perf_counter()
                self._compute(l, x, new, y, s)
                s.ffn_s += time.perf_counter() - t
        if self.gpu is not None and l + 1 in self._pending and self._pending[l + 1][0].done():
            self._settle_prefetch(l + 1, s)  # queue its upload now, beside this layer's kernel
        if self.b_down[l] is not None:
            y = y + self.b_down[l]
        self._last_t = time.perf_counter()
        return y

    def _read(self, l, positions, slots, s):
        if len(positions) == 0:
            return
        t = time.perf_counter()
        res = self._fill(l, positions, slots)
        s.io_wait_s += time.perf_counter() - t
        s.bytes_read += res.bytes
        s.requests += res.requests

    def close(self) -> None:
        for l, (future, slots, _, buf) in list(self._pending.items()):
            try:
                future.result()
            except Exception:
                pass
            self.caches[l].release(slots)
            if buf is not None:
                self.gpu.release(buf)
        self._pending.clear()
        if self.gpu is not None:
            self.gpu.synchronize()
        self.reader.close()
