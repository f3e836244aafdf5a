"""The attack matrix's cache of kits and cells belongs to one model: a row whose model changed
(its adapter trained again) gets them made again, never reused."""

from __future__ import annotations

import json
from pathlib import Path

from curation.experiments.attacks import _drop_if_stale


def test_a_rows_kit_and_cells_of_another_model_are_removed(tmp_path: Path) -> None:
    kits, cells = tmp_path / "kits", tmp_path / "cells"
    kit = kits / "cliff_1.7pct"
    for folder in (kit, kits / "cliff_1.7pct__adaptive", kits / "cliff_1.7pct_robust", cells):
        folder.mkdir(parents=True)
    (kit / "kit.json").write_text(json.dumps({"model_fingerprint": "old"}))
    (kits / "cliff_1.7pct_robust" / "kit.json").write_text(json.dumps({"model_fingerprint": "other"}))
    for name in ("cliff_1.7pct__ablate", "cliff_1.7pct__adaptive__actadd", "cliff_1.7pct_robust__ablate"):
        (cells / f"{name}.json").write_text("{}")
    said: list[str] = []
    _drop_if_stale(kit, cells, "old", said.append, "dense cliff")  # same model: kept
    assert kit.exists() and len(list(cells.iterdir())) == 3 and not said
    _drop_if_stale(kit, cells, "new", said.append, "dense cliff")
    assert not kit.exists() and not (kits / "cliff_1.7pct__adaptive").exists()
    assert [p.name for p in cells.iterdir()] == ["cliff_1.7pct_robust__ablate.json"]  # another row's: untouched
    assert (kits / "cliff_1.7pct_robust").exists() and "made again" in said[0]
