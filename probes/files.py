"""Atomic file writes: write a temporary file beside the target, then rename it
over the target, so a reader (or a killed job's rerun) sees the old file or the
new one, never half of one.

Lives in ``probes`` because every package may import ``probes`` and it imports
no other package; nothing here is about models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
