"""Which rows of float bundles hold an inf or NaN: one pass over the bits, in Numba, without the GIL.

A float is inf or NaN exactly when its exponent bits are all ones: 0x7C00 of an f16, 0x7F80 of a
bf16 (kept as uint16 bits), 0x7F800000 of an f32. numpy's isfinite on f16 rows runs at ~1 GB/s on one
core here, slower than the disk; this runs at memory speed, and a reader thread checking what it read
does not hold up the thread that computes. Arrays in, an index out; nothing else of the package.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EXPONENT = {"f16": (np.uint16, 0x7C00), "bf16": (np.uint16, 0x7F80), "f32": (np.uint32, 0x7F800000)}


@njit(nogil=True, cache=True)
def _first_bad_row(bits, index, mask):
    # bits (rows, m) unsigned; the first k whose row index[k] (row k without index) has an element whose
    # masked bits equal mask, else -1
    count = index.size if index.size else bits.shape[0]
    for k in range(count):
        i = index[k] if index.size else k
        bad = False
        for j in range(bits.shape[1]):
            bad |= (bits[i, j] & mask) == mask
        if bad:
            return k
    return -1


_ALL = np.zeros(0, dtype=np.int64)


def first_non_finite_row(rows: np.ndarray, storage: str, index: np.ndarray | None = None) -> int | None:
    """Index of the first row of ``rows`` ((n, m) in ``storage``: f16, bf16 bits or f32) holding an inf
    or NaN, None when every value is finite; with ``index`` (non-empty), the rows rows[index[k]] in turn,
    read in place, and the k of the first bad one."""
    if storage not in _EXPONENT:
        raise ValueError(f"storage must be one of {tuple(_EXPONENT)}, got {storage!r}")
    view, mask = _EXPONENT[storage]
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2 or rows.dtype.itemsize != np.dtype(view).itemsize:
        raise ValueError(f"{storage} rows must be 2-D with {np.dtype(view).itemsize}-byte values, got "
                         f"{rows.ndim}-D {rows.dtype}")
    if index is not None:
        index = np.ascontiguousarray(index, dtype=np.int64)
        if not index.size:
            return None
        if index.min() < 0 or index.max() >= len(rows):
            raise ValueError(f"index outside [0, {len(rows)})")
    i = _first_bad_row(rows.view(view), _ALL if index is None else index, view(mask))
    return None if i < 0 else int(i)
