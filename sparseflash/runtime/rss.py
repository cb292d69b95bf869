"""Peak resident memory of this process, as the reports state it and as /usr/bin/time measures it.

/usr/bin/time reports the ru_maxrss of the finished process, which Linux takes as the larger of the
process's own peak and that of its largest waited-for child. Three things made the figure `run --json`
printed read lower: it was taken before the run ended (anything allocated afterwards, such as a CUDA
context set up to read device memory, was missed), children were not counted, and since Linux 6.2
ru_maxrss is read from per-CPU RSS counters whose unfolded per-CPU batches (up to max(32, 2 x CPUs)
pages each) are not in the sum, which /proc/self/status's VmHWM counts on the kernels that sum them
exactly. So: take it last (the CLI calls this right before it prints), and take the largest reading.
"""

from __future__ import annotations

import resource


def _vm_hwm_bytes() -> int:
    """VmHWM of /proc/self/status in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size so far in bytes: the largest of this process's ru_maxrss (Linux reports
    KiB), its largest waited-for child's, and VmHWM."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return max(own, children, _vm_hwm_bytes())
