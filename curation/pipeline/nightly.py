"""``curate run MANIFEST``: the nightly job in one validated file.

Score every source into the store (only what is new for this model and
probe), select the budgeted slice from everything scored so far, and write,
next to the slice, a *resolved manifest*: the settings as resolved, each
input's SHA-256, the model fingerprint, the probe id, the code version, counts
and durations per stage, and the selection with its cut-off time. ``curate
run --reproduce RESOLVED`` re-selects from the same store with those values
and checks the slice is byte-identical, however much the store has grown since.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curation.pipeline.score import ScoreSettings, score_records
from curation.pipeline.select import export_selection
from curation.pipeline.sources import iter_candidates
from curation.pipeline.store import Store
from probes.chat import ThinkingFormat
from probes.files import path_sha256, path_size, write_json_atomic
from probes.layouts import Layout
from probes.models import LoadedModel
from probes.refusal import RefusalProbe
from probes.rows import expand

_PACKAGES = ("curation", "probes", "training")


def code_version() -> dict[str, Any]:
    """Package version, git commit (and whether the tree had changes) when run from
    a checkout, and a hash of the package sources that holds without git."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    version: dict[str, Any] = {"source_sha256": h.hexdigest()}
    try:
        version["package"] = importlib.metadata.version("cliff-curate")
    except importlib.metadata.PackageNotFoundError:
        version["package"] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *_PACKAGES], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            version["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return version


@dataclass(frozen=True)
class NightlySettings:
    sources: tuple[str, ...]
    model: str
    probe: str
    db: str
    out: str
    budget: str = "1.7%"
    strategy: str = "cliff"
    seed: int = 0
    score: ScoreSettings = ScoreSettings()
    layout: Layout = Layout()


def run_nightly(lm: LoadedModel, probe: RefusalProbe, cfg: NightlySettings, fmt: ThinkingFormat,
                manifest_path: str | None, resolved_settings: dict[str, Any], log: Any = print,
                store: Store | None = None) -> dict[str, Any]:
    """Score every source, select, write the night's folder. ``store``: the store already opened
    (and its writer lock taken) by the caller, closed here; by default ``cfg.db`` is opened."""
    started = datetime.now(UTC)
    run_dir = Path(cfg.out) / started.strftime("%Y-%m-%dT%H%M%SZ")
    suffix = 1
    while run_dir.exists():  # two runs in one second keep separate folders
        suffix += 1
        run_dir = Path(cfg.out) / f"{started.strftime('%Y-%m-%dT%H%M%SZ')}-{suffix}"
    run_dir.mkdir(parents=True)
    inputs = []
    for source in cfg.sources:
        for path in expand(source, "--sources"):
            inputs.append({"path": str(path), "source": source, "sha256": path_sha256(path), "bytes": path_size(path)})
    durations: dict[str, float] = {}
    per_source: dict[str, dict[str, Any]] = {}
    with store or Store(cfg.db) as store:
        for source in cfg.sources:
            t0 = time.monotonic()
            counts: dict[str, int] = {}
            # Bad rows of any kind are quarantined with the run's id as they pass; none stops the night.
            summary = score_records(lm, probe, store, iter_candidates(source, counts=counts, layout=cfg.layout), fmt, cfg.score,
                                    inputs=[i for i in inputs if i["source"] == source])
            per_source[source] = {"candidates": summary.n_candidates, "new_examples": summary.n_new_examples,
                                  "already_scored": summary.n_already_scored, "scored": summary.n_scored,
                                  "quarantined": summary.n_quarantined, "quarantined_new": summary.n_quarantined_new,
                                  "duplicates": counts.get("duplicates", 0), "run_id": summary.run_id}
            durations[f"score {source}"] = round(time.monotonic() - t0, 2)
            log(f"{source}: {per_source[source]}")
        # The cut-off: this selection reads only rows scored by now, so it can be replayed later.
        as_of = datetime.now(UTC).replace(tzinfo=None)
        t0 = time.monotonic()
        selection = export_selection(store, run_dir / "selection.jsonl", strategy=cfg.strategy, budget_text=cfg.budget,
                                     seed=cfg.seed, fmt=fmt, model_fingerprint=lm.fingerprint, probe_id=probe.probe_id,
                                     as_of=as_of, settings_sha256=summary.settings_sha256)
        durations["select"] = round(time.monotonic() - t0, 2)
    resolved = {
        "manifest": {"path": manifest_path, "sha256": path_sha256(manifest_path) if manifest_path else None},
        "settings": resolved_settings,
        "inputs": inputs,
        "model": {"path": cfg.model, "fingerprint": lm.fingerprint},
        "probe": {"path": cfg.probe, "probe_id": probe.probe_id},
        "db": cfg.db,
        "code": code_version(),
        "counts": per_source,
        "durations_s": durations,
        "selection": {**asdict(selection), "ids": None, "ids_sha256": hashlib.sha256("\n".join(selection.ids).encode()).hexdigest(),
                      "manifest": str(run_dir / "selection.jsonl.manifest.json")},
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(run_dir / "resolved_manifest.json", resolved)
    write_json_atomic(Path(cfg.out) / "latest.json", {"run_dir": str(run_dir), "resolved": str(run_dir / "resolved_manifest.json")})
    return resolved


def reproduce(resolved_path: str | Path, out: str | Path, fmt: ThinkingFormat | None) -> dict[str, Any]:
    """Re-select a past night's slice from its store and compare it with the original."""
    resolved, sel = _read_resolved(resolved_path)
    as_of = datetime.fromisoformat(sel["as_of"]) if sel.get("as_of") else None
    with Store(resolved["db"], read_only=True) as store:
        again = export_selection(store, out, strategy=sel["strategy"], budget_text=sel["budget"], seed=sel["seed"],
                                 target=sel["target"], fmt=fmt, model_fingerprint=sel["model_fingerprint"],
                                 probe_id=sel["probe_id"], as_of=as_of,
                                 # a night recorded before this field existed selected with unclosed rows in
                                 include_unclosed=sel.get("include_unclosed", True),
                                 # and before generation settings were recorded, from the pool now kept under ''
                                 settings_sha256=sel.get("generation_settings") or "")
    ids_sha = hashlib.sha256("\n".join(again.ids).encode()).hexdigest()
    return {"identical": again.output_sha256 == sel["output_sha256"] and ids_sha == sel["ids_sha256"],
            "n_selected": again.n_selected, "original_output_sha256": sel["output_sha256"],
            "output_sha256": again.output_sha256, "output": str(out)}


_RESOLVED_KEYS = ("strategy", "budget", "seed", "target", "model_fingerprint", "probe_id", "output_sha256", "ids_sha256")


def _read_resolved(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A night's resolved manifest and its selection, or an error naming what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--reproduce: file not found: {p}")
    try:
        resolved = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--reproduce {p}: not a resolved manifest (not JSON: {exc})") from None
    if not isinstance(resolved, dict) or not isinstance(resolved.get("selection"), dict) or not resolved.get("db"):
        raise ValueError(f"--reproduce {p}: not a resolved manifest (needs 'db' and a 'selection' object)")
    missing = [k for k in _RESOLVED_KEYS if k not in resolved["selection"]]
    if missing:
        raise ValueError(f"--reproduce {p}: the selection lacks {', '.join(missing)}")
    return resolved, resolved["selection"]
