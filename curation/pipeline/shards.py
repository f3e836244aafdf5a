"""Sharded scoring into Parquet, and merging shards into the store.

``curate score --shard i/N --shard-dir DIR`` scores only the examples whose
content hash falls in slice ``i`` of ``N`` (stable however the input is ordered
or split across files) and writes them to ``DIR/shard-i-of-N/`` instead of
DuckDB, so N machines can score one pool with no shared database. Each chunk
becomes one Parquet file holding its examples and their score rows, written
to a temporary name and renamed, so a killed shard job leaves whole files
only and a rerun skips what they hold. ``curate ingest`` merges shard files
into a store; keys already there are kept, so ingesting twice changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from curation.pipeline.store import GenerationRow, ScoreRow, Store
from probes.files import write_json_atomic

_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = _SHARD.match(text.strip())
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"--shard must be i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def holds(self, example_id: str) -> bool:
        # The content id is a hex digest: its leading bits are uniform and do not depend on input order.
        return int(example_id[:8], 16) % self.count == self.index

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ParquetShardSink:
    """Takes the store's place in ``score_records`` for one shard."""

    def __init__(self, directory: str | Path, shard: Shard) -> None:
        self.dir = Path(directory) / shard.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self._pending: dict[str, CandidateRecord] = {}
        self._scored: set[tuple[str, str, str, str]] = set()
        for part in sorted(self.dir.glob("part-*.parquet")):
            frame = pl.read_parquet(part)
            if "settings_sha256" not in frame.columns:  # a part written before settings were recorded
                frame = frame.with_columns(pl.lit("").alias("settings_sha256"))
            self._scored.update(frame.select("example_id", "model_fingerprint", "probe_id", "settings_sha256").iter_rows())
        self._next = len(list(self.dir.glob("part-*.parquet")))

    def close(self) -> None:
        """Nothing stays open: every chunk is already a whole file."""

    def release(self) -> None:
        """Nothing to release between chunks (the store's readers are not involved)."""

    def reused_ids(self, records: Sequence[CandidateRecord]) -> dict[str, str]:
        """A shard has no memory of other files' ids; ``curate ingest`` merges aliases as examples."""
        return {}

    # The store's interface, as score_records uses it.
    def start_run(self, run_id: str, kind: str, params: dict[str, Any], model_fingerprint: str | None = None,
                  probe_id: str | None = None) -> None:
        write_json_atomic(self.dir / f"run-{run_id}.json", {"run_id": run_id, "kind": kind, "params": params, "status": "running",
                                                "model_fingerprint": model_fingerprint, "probe_id": probe_id,
                                                "shard": self.shard.name, "started_at": _now().isoformat()})

    def finish_run(self, run_id: str, counts: dict[str, Any], status: str = "done") -> None:
        meta = json.loads((self.dir / f"run-{run_id}.json").read_text())
        meta.update(counts=counts, status=status, finished_at=_now().isoformat())
        write_json_atomic(self.dir / f"run-{run_id}.json", meta)

    def add_examples(self, records: Sequence[CandidateRecord]) -> int:
        self._pending = {r.id: r for r in records}
        return len(records)

    def unscored_ids(self, ids: Sequence[str], model_fingerprint: str, probe_id: str, need_verdict: bool = False,
                     settings_sha256: str = "") -> list[str]:
        return [i for i in ids if (i, model_fingerprint, probe_id, settings_sha256) not in self._scored]

    # A shard does not keep generations: a shard job generates what it scores (re-probing from
    # stored generations happens in a store).
    def stored_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRow]:
        return {}

    def add_generations(self, rows: Sequence[GenerationRow]) -> None:
        return None

    def add_quarantine(self, rows: Iterable[QuarantinedRow], run_id: str | None) -> int:
        data = [{"source": q.source, "line": q.line, "reason": q.reason, "raw": q.raw.encode("utf-8", "replace").decode("utf-8"),
                 "run_id": run_id, "quarantined_at": _now()} for q in rows]
        if data:
            self._atomic_parquet(pl.DataFrame(data), f"quarantine-{self._next_name()}")
        return len(data)

    def add_scores(self, rows: Sequence[ScoreRow], replace: bool = False) -> None:
        if not rows:
            return
        now = _now()
        data = []
        for r in rows:
            e, m = self._pending[r.example_id], r.metrics
            data.append({
                "example_id": r.example_id, "prompt": e.prompt, "response": e.response, "category": e.category,
                "source": e.source, "extra": json.dumps(e.extra), "model_fingerprint": r.model_fingerprint,
                "probe_id": r.probe_id, "plateau": m.plateau, "final": m.final, "misalignment": m.misalignment,
                "cliff_position": m.cliff_position, "cliff_relative": m.cliff_relative, "steepness": m.steepness,
                "n_tokens": m.n_tokens, "closed": r.closed, "reasoning": r.reasoning, "trace": r.trace,
                "scored_at": now, "run_id": r.run_id, "answer_verdict": r.answer_verdict,
                "generation_id": r.generation_id, "settings_sha256": r.settings_sha256,
            })
        self._atomic_parquet(pl.DataFrame(data, schema_overrides={"trace": pl.List(pl.Float32)}), f"part-{self._next_name()}")
        self._scored.update((r.example_id, r.model_fingerprint, r.probe_id, r.settings_sha256) for r in rows)

    def _next_name(self) -> str:
        name = f"{self._next:06d}-{os.getpid()}"
        self._next += 1
        return name

    def _atomic_parquet(self, frame: pl.DataFrame, stem: str) -> None:
        tmp = self.dir / f".{stem}.parquet.tmp"
        frame.write_parquet(tmp)
        os.replace(tmp, self.dir / f"{stem}.parquet")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingest_shards(store: Store, directories: Sequence[str | Path]) -> dict[str, int]:
    """Merge every shard file under ``directories`` into ``store``. Each file is
    one transaction and is recorded by content digest, so a rerun skips it."""
    files: list[Path] = []
    for d in directories:
        root = Path(d)
        if not root.exists():
            raise FileNotFoundError(f"shard directory not found: {root}")
        files.extend(sorted(root.rglob("part-*.parquet")) + sorted(root.rglob("quarantine-*.parquet")))
    counts = {"files": 0, "skipped_files": 0, "score_rows": 0, "new_scores": 0, "quarantined": 0}
    for path in files:
        digest = _file_digest(path)
        if store.shard_ingested(digest):
            counts["skipped_files"] += 1
            continue
        frame = pl.read_parquet(path)
        if path.name.startswith("quarantine-"):
            added = store.ingest_quarantine_frame(frame, str(path), digest)
            counts["quarantined"] += added
        else:
            counts["score_rows"] += frame.height
            counts["new_scores"] += store.ingest_score_frame(frame, str(path), digest)
        counts["files"] += 1
    return counts
