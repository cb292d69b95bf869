"""Peak resident memory of this process, as the reports state it."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
