"""The checks of bundles read from a layout file (runtime/streamer.py runs them; so does
bench/bench_stream.py): each bundle's digest against the index, and its values (or quantization
scales) finite, scanned only at a bundle's first read."""

from __future__ import annotations

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.kernels import KernelInputError, check_quantized
from sparseflash.kernels.finite import first_non_finite_row
from sparseflash.layout.format import QUANT_TYPES, LayoutError, check_digests


class StreamError(SparseflashError):
    """A read of the layout file failed (I/O error, unexpected end of file, a bundle that fails its check)."""


def check_bundles(path: str, region, positions: np.ndarray, rows: np.ndarray, index: np.ndarray | None = None,
                  finite: np.ndarray | None = None) -> None:
    """The bundles read for stored ``positions`` of ``region`` (an FfnLayer record), ``rows`` (with
    ``index``: rows[index[i]] holds positions[i], checked in place), are the ones written (digests) and
    hold finite values; else a StreamError naming layer and neuron. ``finite`` (per stored position):
    positions whose values were already found finite, skipped by the scan and set by it."""
    if index is not None and not len(index):
        return
    try:
        check_digests(path, region, positions, rows, index)
    except LayoutError as e:
        raise StreamError(f"{e}: the file changed on disk or the disk returned bad data; copy it again or "
                          "rebuild the layout (`--no-verify` would use these bytes as they are)") from None
    if finite is not None:
        new = np.flatnonzero(~finite[positions])
        if not len(new):
            return
        positions = positions[new]
        index = new if index is None else index[new]
    bad = _first_non_finite(rows, region, index)
    if bad is not None:
        raise StreamError(f"{path}: layer {region.index}, stored neuron {int(positions[bad])}: {_NON_FINITE}")
    if finite is not None:
        finite[positions] = True


_NON_FINITE = ("holds non-finite weights although its digest matches: the layout was written wrong; rebuild it "
               "with `sparseflash prepare`")


def _first_non_finite(rows: np.ndarray, region, index: np.ndarray | None = None) -> int | None:
    """Index (into ``index`` when given: the rows rows[index]) of the first row holding an inf/NaN value
    (or quantization scale), None if all are finite."""
    if region.dtype in QUANT_TYPES:
        if index is not None:
            rows = rows[index]  # a read piece's wanted rows: at most one I/O buffer
        try:
            check_quantized(rows, region.d_model, region.gated, region.dtype)
        except KernelInputError:
            for i in range(len(rows)):  # rare: find which row, for the message
                try:
                    check_quantized(rows[i : i + 1], region.d_model, region.gated, region.dtype)
                except KernelInputError:
                    return i
        return None
    return first_non_finite_row(rows, region.dtype, index)  # exponent bits all ones: inf or NaN
