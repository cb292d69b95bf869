"""GPU side of the streaming runtime (numba.cuda): neuron cache slots in device memory, a ring of
pinned staging buffers, and uploads on a copy stream that overlap compute.

Data path of a read: disk -> (I/O thread) pinned host staging rows -> (copy stream) device staging
rows -> (copy stream, scatter kernel) the layer's cache slots. Order is kept with events, never by
waiting for the whole device:

- ``ready[l]`` is recorded on the copy stream after each upload into layer l; the compute stream
  waits on it before layer l's FFN kernel, so a kernel never reads a slot whose bundle is still
  in flight, while uploads for other layers (the look-ahead prefetch of layer l+1) go on beside it.
- ``computed[l]`` is recorded on the compute stream after layer l's kernel; the copy stream waits
  on it before scattering into layer l, so an evicted slot is not overwritten while a kernel that
  read its old bundle may still run.
- each staging buffer's ``done`` event is recorded after the upload that read it; the buffer is
  handed out again only once that event has completed.

With a real GPU the compute stream is torch's current stream (attention and the FFN kernels are
ordered on it) and the copy stream a separate non-blocking torch stream; under Numba's CUDA
simulator both are simulator streams and every operation completes at once. The engine imports
this module only with ``--device cuda``, so numba.cuda is loaded only then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda


@cuda.jit
def _scatter(src, slots, n, dst):
    i = cuda.grid(1)
    width = src.shape[1]
    if i < n * width:
        row = i // width
        col = i - row * width
        dst[slots[row], col] = src[row, col]


def torch_on_gpu() -> bool:
    """True when torch itself can compute on a GPU (not the case under the simulator)."""
    return torch.cuda.is_available()


def torch_device() -> torch.device:
    """Where resident tensors live with ``--device cuda``: the GPU when torch has one; under the
    simulator (tests, no GPU) they stay on the host."""
    return torch.device("cuda") if torch_on_gpu() else torch.device("cpu")


def _streams():
    """(compute, copy, keep-alive) numba streams."""
    if torch_on_gpu():
        side = torch.cuda.Stream()  # torch creates its streams non-blocking: no implicit sync with compute
        current = torch.cuda.current_stream().cuda_stream
        compute = cuda.external_stream(current) if current else cuda.default_stream()
        return compute, cuda.external_stream(side.cuda_stream), side
    return cuda.stream(), cuda.stream(), None


def device_bytes_in_use() -> int | None:
    """Device memory in use on the current GPU (total - free), None under the simulator."""
    free, total = cuda.current_context().get_memory_info()
    if free == float("inf"):
        return None
    return int(total - free)


def as_device_array(t: torch.Tensor):
    """A float32 torch tensor as a kernel argument: a zero-copy view on a GPU, a host array otherwise.

    No stream synchronisation on import (sync=False): the kernels run on torch's current stream,
    which already orders them after the work that produced the tensor."""
    t = t.contiguous()
    return cuda.as_cuda_array(t, sync=False) if t.is_cuda else t.numpy()


@dataclass
class Staging:
    """One staging buffer: pinned host rows the reads land in, device rows they are copied to."""

    host: np.ndarray
    host_slots: np.ndarray
    device: object
    device_slots: object
    done: object  # event: the last upload from this buffer has finished reading it

    @property
    def rows(self) -> int:
        return self.host.shape[0]


class DeviceCache:
    """Device slot storage of every layer's neuron cache plus the upload machinery."""

    def __init__(self, capacities: list[int], bundle_len: int, dtype, staging_rows: int, buffers: int):
        self.slots = [cuda.device_array((c, bundle_len), dtype=dtype) for c in capacities]
        self.compute_stream, self.copy_stream, self._keep = _streams()
        self.ring = [Staging(cuda.pinned_array((staging_rows, bundle_len), dtype=dtype),
                             cuda.pinned_array(staging_rows, dtype=np.int64),
                             cuda.device_array((staging_rows, bundle_len), dtype=dtype),
                             cuda.device_array(staging_rows, dtype=np.int64), cuda.event())
                     for _ in range(buffers)]
        self._free = deque(self.ring)
        self.ready = [cuda.event() for _ in capacities]
        self.computed = [cuda.event() for _ in capacities]
        self.uploads = 0

    @property
    def staging_nbytes(self) -> int:
        """Bytes of the staging ring: pinned host rows and slot ids, and their device copies."""
        return sum(a.nbytes for buf in self.ring for a in (buf.host, buf.host_slots, buf.device, buf.device_slots))

    @property
    def staging_rows(self) -> int:
        return self.ring[0].rows

    def free_buffers(self) -> int:
        return len(self._free)

    def acquire(self) -> Staging:
        """A staging buffer whose previous upload has finished reading it."""
        if not self._free:
            raise RuntimeError("no free staging buffer (each read must release its buffer)")
        buf = self._free.popleft()
        buf.done.synchronize()
        return buf

    def release(self, buf: Staging) -> None:
        self._free.append(buf)

    def upload(self, layer: int, buf: Staging, rows: int, slots: np.ndarray) -> None:
        """Queue the copy of buf's first ``rows`` rows into ``slots`` of the layer; returns at once."""
        if rows == 0:
            return
        s = self.copy_stream
        buf.host_slots[:rows] = slots
        self.computed[layer].wait(s)  # no slot is overwritten under a kernel still reading it
        buf.device[:rows].copy_to_device(buf.host[:rows], stream=s)
        buf.device_slots[:rows].copy_to_device(buf.host_slots[:rows], stream=s)
        total = rows * buf.host.shape[1]
        threads = 128
        _scatter[(total + threads - 1) // threads, threads, s](buf.device, buf.device_slots, rows, self.slots[layer])
        buf.done.record(s)
        self.ready[layer].record(s)
        self.uploads += 1

    def before_compute(self, layer: int) -> None:
        """Make the compute stream wait for every upload queued into the layer so far."""
        self.ready[layer].wait(self.compute_stream)

    def after_compute(self, layer: int) -> None:
        self.computed[layer].record(self.compute_stream)

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        self.compute_stream.synchronize()
