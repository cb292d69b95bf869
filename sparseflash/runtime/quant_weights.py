"""Quantized resident matrices (q8/q4 attention, embeddings, head) held as their bytes.

The transformer (model/transformer.py) accepts, in place of a weight tensor, any object with
``linear(x)`` (x @ W.T) and ``rows(ids)`` (an embedding lookup); this is that object for the q8/q4
matrices of a layout: ``linear`` runs the kernels' quant_linear, which never makes a dequantized
copy of W, and ``rows`` dequantizes only the rows asked for.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.kernels import dequant_rows, quant_linear


class QuantMatrix:
    """A (rows, cols) matrix stored as q8/q4 rows of bytes (kernels/quant.py layout)."""

    def __init__(self, data: np.ndarray, shape: tuple[int, int], storage: str, device: str = "cpu"):
        self.data = data  # (rows, row_bytes) uint8
        self.shape = torch.Size(shape)
        self.storage = storage
        self.device = torch.device(device)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to(self, device) -> QuantMatrix:
        """The same matrix for ``device``: its bytes stay on the host on the CPU and under numba's
        simulator; on a GPU they are copied to device memory and the numba.cuda kernel is used."""
        device = torch.device(device)
        if device.type == self.device.type:
            return self
        data = self.data if device.type == "cpu" else torch.from_numpy(np.asarray(self.data)).to(device)
        return QuantMatrix(data, tuple(self.shape), self.storage, str(device))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) float -> x @ W.T (..., rows) float32, on x's device."""
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        if self.device.type == "cpu":
            out = quant_linear(flat.numpy(), self.data, self.storage)
            return torch.from_numpy(out).reshape(*x.shape[:-1], self.shape[0])
        from numba import cuda

        out = torch.empty((flat.shape[0], self.shape[0]), dtype=torch.float32, device=x.device)
        quant_linear(cuda.as_cuda_array(flat, sync=False), cuda.as_cuda_array(self.data, sync=False), self.storage,
                     backend="cuda", out=cuda.as_cuda_array(out, sync=False))
        return out.reshape(*x.shape[:-1], self.shape[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) as float32 (..., cols), dequantized from their bytes."""
        data = self.data if self.device.type == "cpu" else self.data.cpu().numpy()
        flat = dequant_rows(np.asarray(data), ids.reshape(-1).cpu().numpy(), self.storage)
        return torch.from_numpy(flat).reshape(*ids.shape, self.shape[1]).to(self.device)
