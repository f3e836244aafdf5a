"""A benchmark worker's own peak resident memory.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the wrong reading for a worker that
was started with fork + exec: Linux carries the high-water mark across
``execve``, so the worker reports its *parent's* resident size at the fork
whenever that is larger than its own peak (a CLI parent that has imported
torch, DuckDB and polars is ~470 MB). ``VmHWM`` in ``/proc/self/status`` belongs
to the address space the worker actually runs in, and starts afresh at exec.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set size of this process's current program, in MiB."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # No /proc (macOS, BSD): ru_maxrss is the best there is; macOS counts it in bytes, others in kB.
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
