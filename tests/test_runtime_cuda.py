"""The streamed engine with its neuron cache on the GPU (Numba's CUDA simulator here)."""

import pytest
import torch
from layouts import tiny_layout

from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.runtime.session import open_streamed


def _cuda_ready():
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_ready(), reason="no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set")
def test_gpu_cache_engine_equals_dense_under_evictions(tmp_path):
    dense, path = tiny_layout(tmp_path, "nemotron", dtype="f32", n_hot=8)
    ids = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = Transformer(dense.config, dense.weights)(ids)
    probe = open_streamed(path, 1 << 40, strategy="all", io_buffer_bytes=4096, device="cuda")
    minimum = probe.engine.memory.minimum
    probe.close()
    model = open_streamed(path, minimum + 2 * 24 * (512 + 33), strategy="all", io_buffer_bytes=4096,
                          device="cuda")
    try:
        assert model.engine.on_gpu and model.engine.caches[0].slots.size == 0  # bundles only on the device
        cache = KVCache(model.layout.config, ids.shape[1])
        out = torch.cat([model.transformer(ids[:, :3], cache=cache, start=0)] +
                        [model.transformer(ids[:, i : i + 1], cache=cache, start=i) for i in range(3, 6)], dim=1)
        assert (out - ref).abs().max().item() <= 1e-4
        assert sum(s.bytes_read for s in model.engine.stats) > 0
        for c in model.engine.caches:
            c.check()
            assert c.capacity < dense.config.intermediate_size
    finally:
        model.close()
