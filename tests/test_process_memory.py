"""Benchmark workers read their own peak memory, not the parent's that started them."""

from __future__ import annotations

import subprocess
import sys

from curation.experiments.process_memory import peak_rss_mb

_CHILD = "from curation.experiments.process_memory import peak_rss_mb; print(peak_rss_mb())"


def test_a_worker_started_by_a_large_parent_reports_its_own_peak() -> None:
    ballast = bytearray(400 * 2**20)  # resident in the parent: every page written
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    parent_peak = peak_rss_mb()
    child = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True)
    child_peak = float(child.stdout.strip())
    del ballast
    assert parent_peak > 400
    # A bare interpreter with this module imported is tens of MB; ru_maxrss would carry the parent's 400+ MB over exec.
    assert 0 < child_peak < parent_peak - 300, (child_peak, parent_peak)


def test_the_peak_covers_memory_since_freed() -> None:
    # In a fresh process, so that no earlier test's allocation already holds the high-water mark.
    code = ("from curation.experiments.process_memory import peak_rss_mb\n"
            "before = peak_rss_mb()\n"
            "block = bytearray(200 * 2**20)\n"
            "for i in range(0, len(block), 4096): block[i] = 1\n"
            "del block\n"
            "print(before, peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, after = map(float, out.stdout.split())
    assert after >= before + 190, (before, after)
