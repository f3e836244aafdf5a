"""A benchmark worker's own resident memory: now, and its peak.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the wrong reading for a worker that
was started with fork + exec: Linux carries the high-water mark across
``execve``, so the worker reports its *parent's* resident size at the fork
whenever that is larger than its own peak (a CLI parent that has imported
torch, DuckDB and polars is ~470 MB). ``VmHWM`` in ``/proc/self/status`` belongs
to the address space the worker actually runs in, and starts afresh at exec;
``VmRSS`` beside it is the size now, so both readings come from one place.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_mb(name: str) -> float | None:
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def _maxrss_mb() -> float:
    # No /proc (macOS, BSD): ru_maxrss is the best there is; macOS counts it in bytes, others in kB.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process's current program, in MiB."""
    peak = _status_mb("VmHWM")
    return _maxrss_mb() if peak is None else peak


def rss_mb() -> float:
    """Resident set size now, in MiB (without /proc: the peak so far, the closest reading there is)."""
    now = _status_mb("VmRSS")
    return _maxrss_mb() if now is None else now
