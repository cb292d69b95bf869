"""The streamed engine with ``--device cuda``: neuron cache in device memory, pinned staging ring,
uploads on a copy stream ordered by events (Numba's CUDA simulator here; the resident-tensor test
needs a real GPU and is skipped without one)."""

import errno
import os

import numpy as np
import pytest
import torch
from layouts import tiny_layout

from sparseflash.errors import SparseflashError
from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.runtime.session import open_streamed


def _cuda_ready():
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


needs_cuda = pytest.mark.skipif(not _cuda_ready(), reason="no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set")


def _run(model, ids, prompt=3):
    cache = model.transformer.new_cache(ids.shape[1])
    return torch.cat([model.transformer(ids[:, :prompt], cache=cache, start=0)] +
                     [model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(prompt, ids.shape[1])],
                     dim=1)


def _predictors(d, n, layers, seed=0):
    """Random top-k predictors for every layer and look-ahead predictors for layers 1.."""
    from sparseflash.layout.predictor import Predictor

    g = torch.Generator().manual_seed(seed)
    make = lambda: Predictor(torch.randn(8, d, generator=g), torch.zeros(8),  # noqa: E731
                             torch.randn(n, 8, generator=g), torch.zeros(n), topk=24, cut=2.0)
    preds = {f"layer.{l}": make() for l in range(layers)}
    preds.update({f"lookahead.{l}": make() for l in range(1, layers)})
    return preds


@needs_cuda
def test_gpu_cache_engine_equals_dense_under_evictions(tmp_path):
    dense, path = tiny_layout(tmp_path, "nemotron", dtype="f32", n_hot=8)
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = Transformer(dense.config, dense.weights)(ids)
    probe = open_streamed(path, 1 << 40, strategy="all", io_buffer_bytes=4096, io_threads=2, device="cuda")
    minimum = probe.engine.memory.minimum
    probe.close()
    from sparseflash.runtime.budget import INDEX_BYTES_PER_SLOT

    model = open_streamed(path, minimum + 2 * 24 * (512 + INDEX_BYTES_PER_SLOT), strategy="all", io_buffer_bytes=4096, io_threads=2,
                          device="cuda")
    try:
        gpu = model.engine.fetcher.gpu
        assert model.engine.on_gpu and model.engine.caches[0].slots.size == 0  # bundles only on the device
        out = _run(model, ids)
        assert (out - ref).abs().max().item() <= 1e-4
        assert sum(s.bytes_read for s in model.engine.stats) > 0
        # the prompt's reads were longer than one staging buffer, so they went up in several chunks
        assert model.engine.stats[0].misses / dense.config.num_layers > gpu.staging_rows
        assert gpu.uploads > len(model.engine.stats) * dense.config.num_layers
        assert gpu.free_buffers() == len(gpu.ring)
        for c in model.engine.caches:
            c.check()
            assert c.capacity < dense.config.intermediate_size
    finally:
        model.close()


@needs_cuda
def test_staging_ring_is_counted_in_the_budget(tmp_path):
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", n_hot=8)
    cpu = open_streamed(path, "80%ffn", strategy="all", io_buffer_bytes=4096, staging=False)  # no host staging region
    gpu = open_streamed(path, cpu.engine.memory.budget, strategy="all", io_buffer_bytes=4096, device="cuda")
    try:
        e = gpu.engine
        assert e.memory.io_buffers == e.fetcher.reader.buffer_total_bytes + e.fetcher.gpu.staging_nbytes
        assert e.memory.total <= e.memory.budget
        assert e.memory.slots_per_layer < cpu.engine.memory.slots_per_layer  # staging came out of the cache
    finally:
        cpu.close()
        gpu.close()


def _deferred_device_cache():
    """A DeviceCache whose copies run only when something waits for them, reading the staging rows
    at that moment, as an asynchronous copy on a real GPU would. An engine that read a slot before
    waiting for its upload, or refilled a staging buffer still being copied, computes wrong logits."""
    from sparseflash.runtime.gpu import DeviceCache

    class Deferred(DeviceCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.queue = []  # (layer, buffer, rows, slots) not yet copied
            self.deferred = 0

        def upload(self, layer, buf, rows, slots):
            if rows:
                self.queue.append((layer, buf, rows, np.array(slots)))
                self.deferred += 1

        def _run_through(self, last):
            todo, self.queue = self.queue[: last + 1], self.queue[last + 1 :]
            for layer, buf, rows, slots in todo:
                DeviceCache.upload(self, layer, buf, rows, slots)

        def _last(self, pick):
            hits = [i for i, q in enumerate(self.queue) if pick(q)]
            return hits[-1] if hits else -1

        def acquire(self):
            if self._free:  # the buffer's event: its queued copies must have read it
                self._run_through(self._last(lambda q: q[1] is self._free[0]))
            return super().acquire()

        def before_compute(self, layer):
            self._run_through(self._last(lambda q: q[0] == layer))

        def synchronize(self):
            self._run_through(len(self.queue) - 1)

    return Deferred


@needs_cuda
def test_predicted_gpu_engine_with_deferred_copies_equals_cpu_engine(tmp_path, monkeypatch):
    import sparseflash.runtime.gpu as gpu_module

    dense, _ = tiny_layout(tmp_path / "probe", "nemotron")
    c = dense.config
    preds = _predictors(c.hidden_size, c.intermediate_size, c.num_layers)
    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", n_hot=4, preds=preds, strategy="topk")
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(io_buffer_bytes=4096, window=1, lookahead=True)
    cpu = open_streamed(path, "30%ffn", **kw)
    try:
        ref = _run(cpu, ids, prompt=4)
        cpu_stats = list(cpu.engine.stats)
    finally:
        cpu.close()
    monkeypatch.setattr(gpu_module, "DeviceCache", _deferred_device_cache())
    model = open_streamed(path, "30%ffn", device="cuda", **kw)
    try:
        out = _run(model, ids, prompt=4)
        gpu = model.engine.fetcher.gpu
        assert gpu.deferred > 0 and model.engine.predictors.lookahead  # copies really were deferred; look-ahead ran
        assert (out - ref).abs().max().item() <= 1e-3
        assert [s.predicted for s in model.engine.stats] == [s.predicted for s in cpu_stats]
        assert sum(s.hits for s in model.engine.stats) > 0
        for cache in model.engine.caches:
            cache.check()
    finally:
        model.close()
    assert not gpu.queue  # close() waited for every copy


@needs_cuda
def test_gpu_engine_stays_consistent_after_eio_mid_read(tmp_path):
    from sparseflash.runtime.build import build_engine
    from sparseflash.runtime.iomodel import DeviceModel
    from sparseflash.runtime.layout_model import open_layout
    from sparseflash.runtime.policy import Budget, Policy
    from sparseflash.runtime.streamer import BundleReader, StreamError

    _, path = tiny_layout(tmp_path, "nemotron", dtype="f16", n_hot=4)
    lm = open_layout(path)
    calls = {"n": 0, "fail_after": None}

    def factory(*args, **kw):
        def preadv(fd, bufs, offset):
            calls["n"] += 1
            if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
                raise OSError(errno.EIO, "Input/output error")
            return os.preadv(fd, bufs, offset)
        return BundleReader(*args, preadv=preadv, **kw)

    policy = Policy(Budget(nbytes=1 << 30), strategy="all", lookahead=False, device="cuda", io_buffer_bytes=4096)
    eng, _ = build_engine(lm, policy, DeviceModel(), reader_factory=factory)
    try:
        calls["fail_after"] = calls["n"] + 2  # a few chunks go through, then the disk fails
        with pytest.raises(StreamError):
            eng(0, torch.randn(1, lm.config.hidden_size))
        assert eng.fetcher.gpu.free_buffers() == len(eng.fetcher.gpu.ring)  # every staging buffer came back
        for cache in eng.caches:
            cache.check()
        calls["fail_after"] = None
        y = eng(0, torch.randn(2, lm.config.hidden_size))  # and the engine works again
        assert torch.isfinite(y).all()
        eng.caches[0].check()
    finally:
        eng.close()
        lm.close()


def test_weights_move_together_and_a_cache_on_another_device_is_refused(tmp_path):
    dense, _ = tiny_layout(tmp_path, "nemotron")
    w = dense.weights
    moved = w.to("meta")  # a device with no data: shows that every tensor moves, without a GPU
    assert moved.device == torch.device("meta")
    assert set(moved.named()) == set(w.named())
    assert all(t.is_meta for t in moved.named().values())
    assert (moved.lm_head is moved.embed) == (w.lm_head is w.embed)  # a tied head stays one tensor
    meta = Transformer(dense.config, moved)
    assert meta.new_cache(4).k.is_meta and meta.inv_freq.is_meta
    model = Transformer(dense.config, w)
    with pytest.raises(SparseflashError, match="KV cache on meta"):
        model(torch.arange(2)[None], cache=KVCache(dense.config, 4, device="meta"), start=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a real CUDA GPU (torch sees none)")
def test_resident_tensors_live_on_the_gpu(tmp_path):
    dense, path = tiny_layout(tmp_path, "nemotron", dtype="f32", n_hot=8)
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = Transformer(dense.config, dense.weights)(ids)
    model = open_streamed(path, "50%ffn", strategy="all", device="cuda")
    try:
        assert model.transformer.device.type == "cuda"
        assert all(t.is_cuda for t in model.transformer.weights.named().values())
        out = _run(model, ids)
        assert (out - ref).abs().max().item() <= 1e-4
        from sparseflash.model.generate import Sampling
        from sparseflash.runtime.session import stream_generate

        _, summary = stream_generate(model, [1, 2, 3], 8, Sampling(greedy=True), stop_at_eos=False)
        # device memory the run added: the budget, the KV cache and a fixed overhead (kernels, cuBLAS)
        assert summary["device_bytes_used"] <= summary["budget_bytes"] + (256 << 20)
    finally:
        model.close()
