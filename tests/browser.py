"""Headless Chromium for the report tests: the page's DOM after its scripts ran, and a screenshot.
Debian's ``chromium``; tests skip, with the reason, where it is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
          "--virtual-time-budget=10000")


def dump_dom(url: str) -> str:
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, *_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def screenshot(url: str, out: Path) -> Path:
    assert CHROMIUM is not None
    subprocess.run([CHROMIUM, *_FLAGS, "--window-size=1280,2400", f"--screenshot={out}", url],
                   capture_output=True, timeout=120, check=True)
    return out
