"""Typed errors raised by the sparse FFN kernels."""

from __future__ import annotations


class KernelInputError(ValueError):
    """An argument has the wrong shape, dtype, storage or an out-of-range slot.

    The message is one line and names the argument and the offending value.
    """


class BackendUnavailableError(RuntimeError):
    """The requested back end cannot run here (e.g. "cuda" without a GPU or simulator)."""
