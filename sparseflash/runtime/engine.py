"""The streaming FFN: per token and layer, predict -> look up the cache -> read what is missing ->
run the sparse kernel over cached slots. Attention, embeddings and norms stay resident.

``StreamingFFN`` plugs into model.transformer.Transformer as its FFN, so generation, perplexity and
teacher forcing run unchanged on top of it. It is handed its parts, built by runtime/build.py:
the caches, the predictors, a fetcher (fills slots: runtime/fetcher.py), a compute step (runs the
kernel over slots: runtime/compute.py); planning is runtime/planner.py. ``__call__`` is the one
per-layer loop, and shows the I/O/compute overlap: layer l+1's look-ahead read (``--lookahead``) runs on
the I/O threads while layer l reads its misses and computes. A one-token host step of the threshold
strategy does steps 2-5 with one native call for the cached neurons (runtime/fused.py)."""

from __future__ import annotations

import time

import numpy as np
import torch

from sparseflash.layout.format import FfnLayer
from sparseflash.runtime.budget import MemoryPlan
from sparseflash.runtime.cache import NeuronCache
from sparseflash.runtime.compute import SparseCompute, count_active
from sparseflash.runtime.fetcher import Fetch, HostFetcher
from sparseflash.runtime.fused import FusedStep
from sparseflash.runtime.planner import LayerPlan, plan_layer, plan_prefetch, plan_prefetch_free
from sparseflash.runtime.policy import Policy
from sparseflash.runtime.predict import Predictors
from sparseflash.runtime.staging import StagingArea
from sparseflash.runtime.token_stats import TokenStats


class StreamingFFN:
    """FFN callable (layer, x) -> y that streams bundles under the policy's budget."""

    def __init__(self, regions: tuple[FfnLayer, ...], caches: list[NeuronCache], predictors: Predictors,
                 fetcher: HostFetcher, compute: SparseCompute, policy: Policy, memory: MemoryPlan, b_down: list,
                 staging: StagingArea | None = None):
        self.regions, self.caches, self.predictors = regions, caches, predictors
        self.staging = staging  # strategy all on the host, a cache smaller than the model: runtime/staging.py
        self._staged: tuple[Fetch, int] | None = None  # the next layer's read into a staging half, and the half
        self.fetcher, self.compute, self.policy, self.memory = fetcher, compute, policy, memory
        self.b_down = b_down  # per layer, on the device y lives on (or None)
        self.stats: list[TokenStats] = []
        self.trace: list[list[np.ndarray]] | None = None  # set to [[] per layer] to record predicted sets
        self._current = TokenStats()
        self._prefetch: dict[int, Fetch] = {}  # layer -> its look-ahead read in flight
        self._last_t, self._step_t = time.perf_counter(), None  # _step_t: the forward step in progress began
        self._ahead_bytes = 0  # bundle bytes of the look-ahead read the current layer started
        self._attention_t = 0.0  # attention time noted since the previous FFN call (note_attention)
        self.fused = FusedStep(self) if FusedStep.usable(self) else None  # the host decode step in one call

    @property
    def strategy(self) -> str:
        return self.predictors.strategy

    @property
    def on_gpu(self) -> bool:
        return self.compute.gpu is not None

    def load_hot(self) -> None:
        """Read every layer's hot region into pinned slots (once, before the first token)."""
        for l, r in enumerate(self.regions):
            if r.n_hot:
                self.fetcher.fill(l, np.arange(r.n_hot), self.caches[l].reserve(r.n_hot), pinned=True)

    # -- the forward step (called by Transformer.forward) -----------------------------------------
    def begin_step(self, tokens: int) -> None:
        """A forward step over ``tokens`` positions starts: a new TokenStats."""
        self._step_t = self._last_t = time.perf_counter()
        self._begin_token(tokens)

    def end_step(self) -> None:
        """The step's logits are computed: close its timeline."""
        t = time.perf_counter()
        if self._step_t is not None:
            self._current.head_s = t - self._last_t
            self._current.token_s = t - self._step_t
        self._step_t = None

    def note_attention(self, seconds: float) -> None:
        """The Transformer timed a layer's attention (called before that layer's FFN)."""
        self._attention_t += seconds

    # -- the per-layer loop ---------------------------------------------------------------------
    def __call__(self, l: int, x: torch.Tensor) -> torch.Tensor:
        t_start = time.perf_counter()
        if l == 0 and self._step_t is None:  # called without begin_step (a bare FFN caller)
            self._begin_token(x.shape[0])
            self._last_t = t_start
        s = self._current
        between = t_start - self._last_t  # since the previous layer's FFN (or the step start)
        attention = min(self._attention_t, between)
        self._attention_t = 0.0
        before = (attention, s.predictor_s, s.io_wait_s, s.ffn_s, s.bytes_read, between - attention)
        s.attention_s += attention
        try:
            y = self._layer(l, x, s)
        except BaseException:  # a failed read or kernel: reads in flight are waited for and their slots freed
            self._abandon_prefetches()
            raise
        self._last_t = time.perf_counter()
        self._record_layer(l, s, self._last_t - t_start, before)
        return y

    def _abandon_prefetches(self) -> None:
        for fetch in self._prefetch.values():
            self.fetcher.abandon(fetch)
        self._prefetch.clear()
        if self._staged is not None:
            staged, self._staged = self._staged, None
            self._drop_staged(staged)

    def _layer(self, l: int, x: torch.Tensor, s: TokenStats) -> torch.Tensor:
        cache = self.caches[l]
        self._finish_prefetch(l, s)  # 1. this layer's look-ahead read (started during layer l-1) lands
        if self.fused is not None and self.fused.applies(x):  # 2-5 with one native call (runtime/fused.py)
            return self._settle(l, self.fused(self, l, x, s), s)
        staged = self._take_staged(l)  # (strategy all) its read into a staging half, landing or landed
        if staged is None and self.staging is not None and self.strategy == "all":
            # the first step (later steps read layer 0 during the previous step's last layer): read now
            self._start_staged(l, np.zeros(0, np.int64), s, ahead=False)
            staged = self._take_staged(l)
        try:
            positions = self._predict(l, x, s)  # 2. predicted active set, as stored positions
            # 3. layer l+1's look-ahead read runs while this layer works; it is queued after this layer's
            # own read (on the host), which the layer waits for
            y = self._layer_steps(l, x, s, cache, positions, staged, lambda: self._start_prefetch(l + 1, x, s))
        except BaseException:
            if staged is not None:
                self._drop_staged(staged)
            raise
        if staged is not None:
            self.staging.give_back(staged[1])
        return y

    def _layer_steps(self, l: int, x: torch.Tensor, s: TokenStats, cache: NeuronCache, positions: np.ndarray,
                     staged: tuple[Fetch, int] | None, ahead) -> torch.Tensor:
        """Steps 4-6 of layer l; ``ahead()`` starts layer l+1's look-ahead read, once: on the host right
        after the layer's own read is queued (the I/O threads take reads in order, so a look-ahead
        read queued first would delay the read this layer waits for), otherwise first."""
        plan = plan_layer(cache, positions)  # 4. hits and misses
        s.hits += len(plan.hit_slots)
        s.misses += len(plan.missing)  # staged neurons included: read for this step, one layer early
        if staged is not None:  # the staged neurons are read (or landing): not read again
            plan = LayerPlan(plan.hit_slots, plan.missing[~np.isin(plan.missing, staged[0].positions)], plan.room)
        cache.touch(plan.hit_slots)
        x = x.float().contiguous()
        y = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)
        if plan.fits and self.on_gpu:  # 5. read the misses, then one kernel call over hits and misses
            ahead()
            new = cache.reserve(len(plan.missing), protect=plan.hit_slots)
            self._read(l, plan.missing, new, s)
            cache.touch(new)
            self._compute(l, x, np.concatenate([plan.hit_slots, new]), y, s)
        elif plan.fits:  # 5. (host) the misses are read while the hits compute; then the misses compute
            new = cache.reserve(len(plan.missing), protect=plan.hit_slots)
            fetch = self.fetcher.start(l, plan.missing, new, demand=True) if len(plan.missing) else None
            self._guarded(fetch, ahead)
            self._guarded(fetch, self._compute, l, x, plan.hit_slots, y, s)
            if staged is not None:  # then the staged neurons, read during layer l-1
                self._guarded(fetch, self._compute_staged, l, x, staged[0], y, s)
            if fetch is not None:
                self._land(fetch, s)
                self._compute(l, x, new, y, s)
        else:  # 5'. more neurons than the cache holds: accumulate the output over batches
            ahead()
            self._compute_in_batches(l, x, plan, y, s, staged[0] if staged is not None else None)
        return self._settle(l, y, s)

    def _settle(self, l: int, y: torch.Tensor, s: TokenStats) -> torch.Tensor:
        pending = self._prefetch.get(l + 1)
        if pending is not None and pending.done():  # 6. settle a finished look-ahead read now (GPU: queue its upload)
            self._finish_prefetch(l + 1, s)
        return y if self.b_down[l] is None else y + self.b_down[l]

    def _record_layer(self, l: int, s: TokenStats, span: float, before: tuple) -> None:
        """Append layer l's row to the token's timeline (TokenStats.TIMELINE_FIELDS)."""
        attention, predict, io, compute = (before[0], s.predictor_s - before[1], s.io_wait_s - before[2],
                                           s.ffn_s - before[3])
        ahead_bytes, self._ahead_bytes = self._ahead_bytes, 0
        other = span - predict - io - compute + before[5]  # + norms and adds before this FFN
        s.timeline.append([attention, predict, io, compute, other, s.bytes_read - before[4], ahead_bytes])

    # -- the steps ------------------------------------------------------------------------------
    def _begin_token(self, tokens: int) -> TokenStats:
        s = TokenStats(tokens=tokens, needed=0 if self.policy.counts_needed else None)
        self._attention_t = 0.0
        self.stats.append(s)
        self._current = s
        for l, cache in enumerate(self.caches):
            cache.tick()
            if not self.policy.reuse and l not in self._prefetch:  # the no-cache baseline forgets everything
                cache.evict(np.nonzero((cache.position_of >= 0) & ~cache.pinned)[0])
        return s

    def _predict(self, l: int, x: torch.Tensor, s: TokenStats) -> np.ndarray:
        t = time.perf_counter()
        if self.strategy == "all":
            positions = np.arange(self.regions[l].n_neurons)
        else:  # with a scored eviction policy the logits also rank the cached neurons
            p, scored = self.predictors.own[l], self.caches[l].scored
            out = p.predict(x, self.strategy, self.policy.margin, scores=scored, offset=self._cost_offset(l, p),
                            cached=self._cached(l, p))
            positions = out[0] if scored else out
            if scored:
                self.caches[l].note_scores(out[1])
        s.predictor_s += time.perf_counter() - t
        s.predicted += len(positions)
        s.per_layer_predicted.append(len(positions))
        if self.trace is not None:
            self.trace[l].append(positions)
        return positions

    def applies_miss_cut(self, predictor) -> bool:
        """Whether ``predictor``'s miss cut (and cached cut) is in force: it has one for its layer's cache
        (build.py fits each layer's cut to its cache: Predictors.for_caches) and the policy uses it."""
        return predictor.miss_cut is not None and self.policy.miss_cut

    def _cached(self, l: int, predictor) -> np.ndarray | None:
        """Per stored position, whether layer l's neuron is in memory (hot region included), for
        ``predictor``'s miss cut; None when the cut is not in force."""
        return self.caches[l].slot_of >= 0 if self.applies_miss_cut(predictor) else None

    def miss_cut_layers(self) -> int:
        """How many layers apply the layout's miss cut in this run."""
        if self.strategy == "all":
            return 0
        return sum(self.applies_miss_cut(self.predictors.own[l]) for l in range(len(self.caches)))

    def cost_terms(self, predictor) -> tuple[float, float] | None:
        """Cost-aware selection (logits): +bonus where a neuron is in memory (hot region included; plus
        ``predictor``'s validated one where its miss cut applies), -penalty where it must be read; or None."""
        validated = predictor.cached_bonus if self.applies_miss_cut(predictor) else 0.0
        bonus, penalty = self.policy.cached_bonus + validated, self.policy.miss_penalty
        return (bonus, penalty) if bonus or penalty else None

    def _cost_offset(self, l: int, predictor) -> np.ndarray | None:
        terms = self.cost_terms(predictor)  # per stored position of layer l
        return None if terms is None else np.where(self.caches[l].slot_of >= 0, *np.float32([terms[0], -terms[1]]))

    def _start_prefetch(self, nxt: int, x: torch.Tensor, s: TokenStats) -> None:
        if nxt == len(self.regions) and self.strategy == "all":
            nxt = 0  # wrap around: the next step's first layer, all of which it needs whatever its tokens
        if nxt >= len(self.regions) or nxt in self._prefetch:
            return
        t = time.perf_counter()
        cache = self.caches[nxt]
        if self.strategy == "all":  # the whole next layer is needed: read what is missing into free slots
            missing = plan_prefetch_free(cache, self.fetcher.prefetch_limit())
        else:
            ahead = self.predictors.lookahead.get(nxt)
            if ahead is None:
                return
            wanted, scores = (self.fused and self.fused.lookahead(self, ahead, cache, x)) or ahead.predict(
                x, self.strategy, self.policy.margin, True, self._cost_offset(nxt, ahead), self._cached(nxt, ahead), self.policy.lookahead_raise)
            if cache.scored:  # rank layer nxt's cache by the look-ahead
                cache.note_lookahead(scores)
            missing = plan_prefetch(cache, wanted, self.policy.min_slots, self.fetcher.prefetch_limit())
        if len(missing):
            s.prefetched += len(missing)
            self._prefetch[nxt] = self.fetcher.start(nxt, missing, cache.reserve(len(missing)))
            self._ahead_bytes = len(missing) * self.regions[nxt].bundle_bytes
        if self.strategy == "all" and self.staging is not None:  # the rest into a staging half, as much as it holds
            self._start_staged(nxt, missing, s)
        s.predictor_s += time.perf_counter() - t

    def _start_staged(self, nxt: int, exclude: np.ndarray, s: TokenStats, ahead: bool = True) -> None:
        """Start reading layer ``nxt``'s uncached neurons (but ``exclude``, read into its cache) into the
        free staging half, as many as it holds; ``ahead``: a look-ahead read (else the layer's own,
        started as its step begins: the first layer of a step, which nothing runs before)."""
        half = self.staging.free_half() if self._staged is None else None
        if half is None:
            return
        rest = np.nonzero(self.caches[nxt].slot_of < 0)[0]
        rest = rest[~np.isin(rest, exclude)] if len(exclude) else rest
        view = self.staging.take(nxt, half)
        if not len(rest := rest[: view.capacity]):
            self.staging.give_back(half)
            return
        try:
            fetch = self.fetcher.start(nxt, rest, np.arange(len(rest)), into=view)
        except BaseException:
            self.staging.give_back(half)
            raise
        self._staged = (fetch, half)
        if ahead:
            s.prefetched += len(rest)
            self._ahead_bytes += len(rest) * self.regions[nxt].bundle_bytes

    def _take_staged(self, l: int) -> tuple[Fetch, int] | None:
        """Layer l's staged read (started during layer l-1), now the layer's to land and compute over."""
        staged, self._staged = self._staged, None
        if staged is not None and staged[0].layer != l:  # the caller did not run the layers in order: not wanted
            self._drop_staged(staged)
            return None
        return staged

    def _drop_staged(self, staged: tuple[Fetch, int]) -> None:
        """Wait for a staged read to end, unwanted, and free its half."""
        self.fetcher.abandon(staged[0])
        self.staging.give_back(staged[1])

    def _compute_staged(self, l: int, x: torch.Tensor, fetch: Fetch, y: torch.Tensor, s: TokenStats) -> None:
        """Wait for the layer's staged read (counted as I/O wait) and compute over its rows."""
        self._wait(fetch, s)
        self._compute(l, x, fetch.slots, y, s, fetch.cache)

    def _finish_prefetch(self, l: int, s: TokenStats) -> None:
        if (fetch := self._prefetch.pop(l, None)) is not None:
            self._wait(fetch, s)

    def _wait(self, fetch: Fetch, s: TokenStats) -> None:
        """Wait for a read and commit its slots (counted as I/O wait, with the read itself if it ran here)."""
        t = time.perf_counter()
        result = self.fetcher.finish(fetch)
        s.add_read(result, time.perf_counter() - t + (result.seconds if result.inline else 0.0))

    def _read(self, l: int, positions: np.ndarray, slots: np.ndarray, s: TokenStats) -> None:
        if len(positions):
            t = time.perf_counter()
            s.add_read(self.fetcher.fill(l, positions, slots), time.perf_counter() - t)

    def _compute(self, l: int, x: torch.Tensor, slots: np.ndarray, y: torch.Tensor, s: TokenStats,
                 cache=None) -> None:
        """The kernel over ``slots`` of the layer's cache (or of ``cache``: a staging half)."""
        t = time.perf_counter()
        cache = self.caches[l] if cache is None else cache
        acts = self.compute(l, x, cache, slots, y, activations=s.needed is not None)
        if acts is not None:
            s.needed += count_active(acts, self.fetcher.norms.of(l, cache.position_of[slots]), self.regions[l].threshold)
        s.ffn_s += time.perf_counter() - t

    def _compute_in_batches(self, l: int, x: torch.Tensor, plan: LayerPlan, y: torch.Tensor, s: TokenStats,
                            staged: Fetch | None = None, hits_computed: bool = False) -> None:
        """The hits first (then the ``staged`` rows; ``hits_computed``: runtime/fused.py did them, they are still
        protected as here), then the misses in batches that reuse every unpinned slot, oldest first. On the
        host, batches are half the unpinned slots and the next batch is read while the current one computes."""
        cache = self.caches[l]
        unpinned = int((~cache.pinned).sum())
        pipelined = not self.on_gpu and unpinned >= 2
        step = unpinned // 2 if pipelined else unpinned
        parts = [plan.missing[i : i + step] for i in range(0, len(plan.missing), step)]
        fetch = None
        if pipelined and self._room_for(l, len(parts[0]), plan.hit_slots):  # the first read overlaps the hits
            fetch = self._start_batch(l, parts[0], plan.hit_slots)
        if not hits_computed:
            self._guarded(fetch, self._compute, l, x, plan.hit_slots, y, s)
        if staged is not None:
            self._guarded(fetch, self._compute_staged, l, x, staged, y, s)
        if pipelined and fetch is None:  # it needs the hits' slots: start it once they are computed
            fetch = self._start_batch(l, parts[0], plan.hit_slots[:0])
        for k, part in enumerate(parts):
            if pipelined:
                self._land(fetch, s)
                new = fetch.slots
                # the next batch's read runs while this one computes
                fetch = self._start_batch(l, parts[k + 1], new) if k + 1 < len(parts) else None
            else:
                new = self._reserve_batch(l, part, plan.hit_slots[:0])
                self._read(l, part, new, s)
                cache.touch(new)
            self._guarded(fetch, self._compute, l, x, new, y, s)

    def _reserve_batch(self, l: int, part: np.ndarray, protect: np.ndarray) -> np.ndarray:
        """Slots for a batch of misses: free ones, then the oldest unpinned ones not in ``protect``
        (within one step every cached neuron was used by it, so the window cannot protect them)."""
        cache = self.caches[l]
        need = len(part) - cache.free_count()
        if need > 0:
            victims = np.nonzero((cache.position_of >= 0) & ~cache.pinned)[0]
            if len(protect):
                victims = victims[~np.isin(victims, protect)]
            cache.evict(victims[np.argsort(cache.last_use[victims], kind="stable")][:need])
        return cache.reserve(len(part))

    def _room_for(self, l: int, count: int, protect: np.ndarray) -> bool:
        cache = self.caches[l]
        held = (cache.position_of >= 0) & ~cache.pinned
        return cache.free_count() + int(held.sum()) - int(held[protect].sum()) >= count

    def _start_batch(self, l: int, part: np.ndarray, protect: np.ndarray) -> Fetch:
        return self.fetcher.start(l, part, self._reserve_batch(l, part, protect))

    def _guarded(self, fetch: Fetch | None, fn, *args) -> None:
        """fn(*args) while ``fetch`` is in flight: if fn fails, the read is abandoned (its slots freed)."""
        try:
            fn(*args)
        except BaseException:
            if fetch is not None:
                self.fetcher.abandon(fetch)
            raise

    def _land(self, fetch: Fetch, s: TokenStats) -> None:
        """Wait for a read this step started, commit its slots and mark them used."""
        self._wait(fetch, s)
        self.caches[fetch.layer].touch(fetch.slots)

    def close(self) -> None:
        self._abandon_prefetches()
        self.fetcher.close()
