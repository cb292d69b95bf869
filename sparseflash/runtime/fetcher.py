"""Filling cache slots with bundles read from the layout file: straight into host slots, or through
pinned staging buffers into device memory. One interface for both:

- ``fill(layer, positions, slots)``: read now, then commit (demand reads, the hot region);
- ``start(layer, positions, slots)`` -> Fetch, later ``finish(fetch)``: a read that runs on the I/O
  threads while the caller computes (the look-ahead prefetch); ``prefetch_limit()`` says how many
  bundles such a read may take now;
- ``abandon(fetch)``: wait for it to end and give its slots back (closing with a read in flight).

Slots are committed to the cache index only after their read succeeded: a failed read releases
its reserved slots and re-raises, so the cache stays consistent. Where the run counts truly active
neurons (Policy.count_needed), committing also learns each new neuron's down-column norm, which turns
activations into magnitudes. A neuron's norm is a constant: it is computed from the first read of its
bundle and kept per stored position (``fetcher.norms``, DownNorms), so a bundle read again costs
nothing, and whoever holds a slot's stored position can look its norm up.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from sparseflash.kernels import dequantize
from sparseflash.layout import schema
from sparseflash.layout.format import QUANT_TYPES
from sparseflash.runtime.budget import STAGING_BUFFERS
from sparseflash.runtime.cache import NeuronCache
from sparseflash.runtime.streamer import BundleReader, ReadResult


@dataclass
class Fetch:
    """A read in flight into reserved ``slots`` of one layer's cache."""

    layer: int
    positions: np.ndarray
    slots: np.ndarray
    future: Future  # or runtime/aio.py's AioRead: done(), result(), exception()
    staging: object = None  # the staging buffer of a device read
    cache: object = None  # where the slots are: the layer's NeuronCache, or a StagedSlots (runtime/staging.py)

    def done(self) -> bool:
        return self.future.done()


def down_columns(rows: np.ndarray, d_model: int, storage: str) -> np.ndarray:
    """float32 (k, d) down columns of bundle rows (k, bundle_len) in ``storage``: the bundle's last part."""
    if storage in QUANT_TYPES:
        return dequantize(rows[:, -schema.part_bytes(d_model, storage):], storage, check=False)
    return schema.to_float32(rows[:, -d_model:], storage)


class DownNorms:
    """||W_down[:, i]|| per stored position of each layer, filled from the first read of each bundle
    (NaN: not seen yet). 4 bytes per neuron (runtime/budget.py: INDEX_BYTES_PER_NEURON)."""

    def __init__(self, neurons: list[int], d_model: int, storage: str):
        self.known = [np.full(n, np.nan, dtype=np.float32) for n in neurons]
        self.d_model, self.storage = d_model, storage

    def learn(self, layer: int, positions: np.ndarray, rows: np.ndarray, picks: np.ndarray) -> None:
        """Record the norms of ``positions`` not seen yet, whose bundles are ``rows[picks]`` (host rows in
        the storage dtype)."""
        known = self.known[layer]
        new = np.nonzero(np.isnan(known[positions]))[0]
        block = max(1, (1 << 20) // (4 * self.d_model))  # widen at most ~1 MiB of down columns at a time
        for i in range(0, len(new), block):
            part = new[i : i + block]
            down = down_columns(rows[picks[part]], self.d_model, self.storage)
            known[positions[part]] = np.linalg.norm(down, axis=1)

    def of(self, layer: int, positions: np.ndarray) -> np.ndarray:
        """The norms of ``positions`` (each read, hence learnt, before)."""
        return self.known[layer][positions]


def commit_rows(cache: NeuronCache, slots: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                picks: np.ndarray, norms: DownNorms | None, layer: int, pinned: bool = False) -> None:
    """Mark ``slots`` as holding ``positions`` and, with ``norms``, learn their down-column norms
    (bundles in ``rows[picks]``, host rows in the storage dtype)."""
    cache.commit(slots, positions, pinned)
    if norms is not None:
        norms.learn(layer, positions, rows, picks)


class HostFetcher:
    """Reads bundles into the layers' host cache slots."""

    def __init__(self, reader: BundleReader, caches: list[NeuronCache], d_model: int, storage: str,
                 norms: bool = True):
        """``norms``: record down-column norms on commit (needed to count truly active neurons)."""
        self.reader, self.caches, self.d_model, self.storage = reader, caches, d_model, storage
        self.norms = DownNorms([c.neurons for c in caches], d_model, storage) if norms else None

    def prefetch_limit(self) -> int | None:
        """Most bundles a look-ahead read may take now (None: no limit beyond the cache's room)."""
        return None

    def start(self, layer: int, positions: np.ndarray, slots: np.ndarray, into=None, demand: bool = False) -> Fetch:
        """``into``: the slots' owner when not the layer's cache (a staging half, runtime/staging.py);
        ``demand``: the caller waits for this read next (a small one may then be read on its thread:
        BundleReader.submit's ``inline_ok``)."""
        cache = self.caches[layer] if into is None else into
        return Fetch(layer, positions, slots, self.reader.submit(layer, positions, cache.slots, slots, demand),
                     cache=cache)

    def finish(self, fetch: Fetch, pinned: bool = False) -> ReadResult:
        cache = fetch.cache
        try:
            result = fetch.future.result()
        except BaseException:
            cache.release(fetch.slots)
            raise
        commit_rows(cache, fetch.slots, fetch.positions, cache.slots, fetch.slots, self.norms, fetch.layer, pinned)
        return result

    def fill(self, layer: int, positions: np.ndarray, slots: np.ndarray, pinned: bool = False) -> ReadResult:
        return self.finish(self.start(layer, positions, slots, demand=True), pinned)

    def abandon(self, fetch: Fetch) -> None:
        """Wait for the read to end (its outcome no longer matters) and release its slots."""
        fetch.future.exception()  # waits; its error no longer matters
        (fetch.cache if fetch.cache is not None else self.caches[fetch.layer]).release(fetch.slots)

    def close(self) -> None:
        self.reader.close()


class DeviceFetcher(HostFetcher):
    """Reads bundles into pinned staging buffers and queues their upload into device cache slots
    (runtime/gpu.py:DeviceCache). Demand reads go in staging-buffer-sized chunks, two in flight:
    while one chunk's rows are copied up (asynchronously, on the copy stream) the next is read."""

    def __init__(self, reader: BundleReader, caches: list[NeuronCache], d_model: int, storage: str, device_cache,
                 norms: bool = True):
        super().__init__(reader, caches, d_model, storage, norms)
        self.gpu = device_cache

    def prefetch_limit(self) -> int:
        # a look-ahead read takes one staging buffer, only while a demand read would still have two
        return self.gpu.staging_rows if self.gpu.free_buffers() >= STAGING_BUFFERS else 0

    def start(self, layer: int, positions: np.ndarray, slots: np.ndarray, into=None, demand: bool = False) -> Fetch:
        if into is not None:
            raise ValueError("internal: staging regions are a host feature; a device read fills cache slots")
        buf = self.gpu.acquire()
        try:
            future = self.reader.submit(layer, positions, buf.host, np.arange(len(positions)), demand)
        except BaseException:
            self.gpu.release(buf)
            raise
        return Fetch(layer, positions, slots, future, buf)

    def finish(self, fetch: Fetch, pinned: bool = False) -> ReadResult:
        buf = fetch.staging
        try:
            result = fetch.future.result()
        except BaseException:
            self.gpu.release(buf)
            self.caches[fetch.layer].release(fetch.slots)
            raise
        n = len(fetch.positions)
        self.gpu.upload(fetch.layer, buf, n, fetch.slots)  # queued on the copy stream; returns at once
        commit_rows(self.caches[fetch.layer], fetch.slots, fetch.positions, buf.host, np.arange(n), self.norms,
                    fetch.layer, pinned)
        self.gpu.release(buf)  # handed out again only once its upload has read it (the buffer's event)
        return result

    def fill(self, layer: int, positions: np.ndarray, slots: np.ndarray, pinned: bool = False) -> ReadResult:
        total, step = ReadResult(), self.gpu.staging_rows
        inflight: list[Fetch] = []
        started = 0  # positions[:started] are committed, in flight, or released by a failed finish
        try:
            for a in range(0, len(positions), step):
                while inflight and (len(inflight) >= 2 or not self.gpu.free_buffers()):
                    _add(total, self.finish(inflight.pop(0), pinned))
                inflight.append(self.start(layer, positions[a : a + step], slots[a : a + step]))
                started = min(a + step, len(positions))
            while inflight:
                _add(total, self.finish(inflight.pop(0), pinned))
        except BaseException:
            for fetch in inflight:  # let the other reads end before their buffers and slots are reused
                self.abandon(fetch)
            self.caches[layer].release(slots[started:])
            raise
        return total

    def abandon(self, fetch: Fetch) -> None:
        super().abandon(fetch)
        self.gpu.release(fetch.staging)

    def close(self) -> None:
        self.gpu.synchronize()
        super().close()


def _add(total: ReadResult, part: ReadResult) -> None:
    total.requests += part.requests
    total.bytes += part.bytes
    total.model_s += part.model_s
    total.start = part.start if total.end == 0 else min(total.start, part.start)
    total.end = max(total.end, part.end)
    total.seconds = total.end - total.start
