"""Assemble a streaming engine from an open layout: predictors, reader, memory plan, caches,
fetcher and compute step, and the resident weights the transformer should run with.

Nothing it is given is changed: with ``--device cuda`` the resident weights and predictors are
moved as new objects, returned beside the engine.
"""

from __future__ import annotations

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.model.weights import ModelWeights
from sparseflash.runtime import nativecache
from sparseflash.runtime.budget import STAGING_BUFFERS, BudgetError, plan_memory, staging_nbytes, staging_rows
from sparseflash.runtime.cache import PROBATION_USES, NeuronCache
from sparseflash.runtime.compute import SparseCompute
from sparseflash.runtime.engine import StreamingFFN
from sparseflash.runtime.fetcher import DeviceFetcher, HostFetcher
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.layout_model import LayoutModel
from sparseflash.runtime.policy import Policy
from sparseflash.runtime.predict import load_predictors
from sparseflash.runtime.staging import StagingArea
from sparseflash.runtime.streamer import BundleReader

STORAGE_NP = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "q8": np.uint8, "q4": np.uint8}


def resident_bytes(weights: ModelWeights) -> int:
    """Bytes of the resident tensors (a tied head counted once)."""
    unique = {id(t): t for t in weights.named().values()}
    return sum(t.nbytes for t in unique.values())


def build_engine(lm: LayoutModel, policy: Policy, device: DeviceModel, backend: str = "cpu",
                 reader_factory=BundleReader, plugin_bytes: int = 0) -> tuple[StreamingFFN, ModelWeights]:
    """(engine, resident weights for the Transformer) for ``lm`` under ``policy``; refuses with a
    BudgetError when the budget cannot hold the engine's minimum. ``plugin_bytes``: compression
    plugins the run holds, counted in the budget."""
    from sparseflash.kernels import get_backend
    from sparseflash.kernels.halfbits import KERNEL_DTYPE

    regions = lm.file.layers
    if any(r.compressed for r in regions):
        raise SparseflashError(f"{lm.path}: FFN regions are zstd-compressed; streaming needs an uncompressed "
                               "layout (rebuild without --zstd)")
    predictors = load_predictors(lm.file, lm.header, policy.strategy, policy.lookahead, policy.verify)
    on_gpu = policy.device == "cuda"
    if on_gpu:
        backend = "cuda"
    try:
        kernel = get_backend(backend)
    except Exception as e:  # BackendUnavailableError: no GPU and no simulator
        raise SparseflashError(f"--device {policy.device}: {e}") from None
    reader = reader_factory(lm.path, list(regions), device, policy.io, policy.io_threads, policy.io_buffer_bytes,
                            verify=policy.verify)
    try:
        rows = staging_rows(regions, policy.io_buffer_bytes) if on_gpu else 0
        staging = staging_nbytes(rows, max(r.bundle_bytes for r in regions)) if on_gpu else 0
        stage_all = policy.staging and predictors.strategy == "all" and not on_gpu
        meta = lm.header.predictors  # the cache split by demand, where the layout records one and predictors run
        demand = meta.cache_demand if meta and policy.split_cache and predictors.strategy != "all" else None
        memory = plan_memory(regions, resident_bytes(lm.weights), predictors.nbytes,
                             reader.buffer_total_bytes + staging, policy.budget, policy.min_slots, plugin_bytes,
                             stage_all=stage_all, demand=demand)
        storage = regions[0].dtype
        if backend == "cpu":
            kernel.warmup((storage,))  # compile (or load) before the first token, not during it
        if not on_gpu and predictors.own:
            from sparseflash.kernels import predictor as predictor_kernel

            predictor_kernel.warmup()  # the fused decode-time predictor (runtime/predict.py), likewise
            if backend == "cpu" and storage in KERNEL_DTYPE and predictors.strategy == "threshold":
                from sparseflash.kernels import step

                step.warmup((KERNEL_DTYPE[storage],))  # the fused host step (runtime/fused.py)
        nativecache.warmup()  # the caches' native bookkeeping (runtime/nativecache.py), likewise
        caches = [NeuronCache(r.n_neurons, r.n_hot + memory.slots_of(l), r.bundle_len, STORAGE_NP[r.dtype],
                              policy.window, policy.eviction, host_slots=not on_gpu,
                              probation_uses=PROBATION_USES if policy.probation else 0.0) for l, r in enumerate(regions)]
        # the miss cuts validated for the whole cache's share (prepare validated them with this split)
        predictors = predictors.for_caches(sum(c.capacity for c in caches) / sum(c.neurons for c in caches))
        # per-neuron biases are gathered by slot on the host
        b_up = [None if w.b_up is None else w.b_up.float().numpy() for w in lm.weights.layers]
        b_gate = [None if w.b_gate is None else w.b_gate.float().numpy() for w in lm.weights.layers]
        weights, gpu = lm.weights, None
        if on_gpu:  # bundles live in device memory; resident tensors move to torch's GPU if it has one
            from sparseflash.runtime.gpu import DeviceCache, torch_device

            gpu = DeviceCache([c.capacity for c in caches], regions[0].bundle_len, STORAGE_NP[storage], rows,
                              STAGING_BUFFERS)
            weights = lm.weights.to(torch_device())
            predictors = predictors.to(torch_device())
            fetcher = DeviceFetcher(reader, caches, lm.config.hidden_size, storage, gpu, policy.counts_needed)
        else:
            fetcher = HostFetcher(reader, caches, lm.config.hidden_size, storage, policy.counts_needed)
        compute = SparseCompute(kernel, lm.config.ffn_kind, storage, b_up, b_gate, gpu)
        area = (StagingArea(regions, memory.staging_rows, [STORAGE_NP[r.dtype] for r in regions])
                if memory.staging_rows else None)
        engine = StreamingFFN(regions, caches, predictors, fetcher, compute, policy, memory,
                              [w.b_down for w in weights.layers], area)
        engine.load_hot()
    except BaseException:
        reader.close()
        raise
    return engine, weights


__all__ = ["BudgetError", "build_engine", "resident_bytes"]
