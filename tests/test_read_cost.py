"""Read cost of a mask in stored order (requests and bytes per token), worked out block by block,
and the same when the tokens are taken a chunk at a time (the chunking bounds its memory)."""

import numpy as np
import pytest

from sparseflash.layout import format_extents
from sparseflash.layout.format_extents import BLOCK, block_span, mask_read_cost


def direct_cost(mask, bundle_bytes):
    first, last = block_span(np.arange(mask.shape[1]), bundle_bytes)
    out = []
    for row in mask:
        blocks = sorted({b for p in np.nonzero(row)[0] for b in range(first[p], last[p] + 1)})
        runs = sum(1 for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b - 1)
        out.append((runs, len(blocks) * BLOCK))
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 8 * 40, 16 << 20])
def test_mask_read_cost_equals_the_block_by_block_count_in_any_chunking(monkeypatch, chunk_bytes):
    rng = np.random.default_rng(0)
    mask = rng.random((37, 50)) < 0.2
    mask[5] = False  # a token that reads nothing
    bundle_bytes = 3 * BLOCK // 2  # neurons straddle block boundaries
    monkeypatch.setattr(format_extents, "COST_CHUNK_BYTES", chunk_bytes)
    requests, nbytes = mask_read_cost(mask, bundle_bytes)
    assert list(zip(requests.tolist(), nbytes.tolist())) == direct_cost(mask, bundle_bytes)
    assert requests[5] == nbytes[5] == 0
