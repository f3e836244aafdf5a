"""The DuckDB store: its schema and every SQL statement (parameterised only).

Over 300 lines because it is the one module that holds SQL: a review of what
reaches the database (parameters only, never formatted values) reads one file.

Score rows are keyed by (example_id, model_fingerprint, probe_id,
settings_sha256): the example, the probe, and the generation its trace was read
from (the model and the digest of the generation settings; the prompt comes with
the example). They are written with ``INSERT OR IGNORE`` inside one transaction
per batch, so rescoring is a no-op and a killed job leaves only whole batches
behind. A selection reads one pool: one model, one probe, one set of generation
settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import duckdb

from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from probes.chat import ThinkingFormat
from probes.cliff import CliffMetrics

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS examples (
        id VARCHAR PRIMARY KEY,
        prompt VARCHAR NOT NULL,
        response VARCHAR NOT NULL,
        category VARCHAR,
        source VARCHAR,
        extra JSON,
        added_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS scores (
        example_id VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        probe_id VARCHAR NOT NULL,
        plateau DOUBLE NOT NULL,
        final DOUBLE NOT NULL,
        misalignment DOUBLE NOT NULL,
        cliff_position INTEGER NOT NULL,
        cliff_relative DOUBLE NOT NULL,
        steepness DOUBLE NOT NULL,
        n_tokens INTEGER NOT NULL,
        closed BOOLEAN NOT NULL,
        reasoning VARCHAR NOT NULL,
        trace FLOAT[] NOT NULL,
        scored_at TIMESTAMP NOT NULL,
        run_id VARCHAR NOT NULL,
        -- The keyword judge's verdict on the model's own answer, when scoring
        -- generated through the answer (--judge-answers); the rule baseline reads it.
        answer_verdict VARCHAR,
        -- The generation the trace was read from, and the digest of its settings ('' on rows
        -- scored before settings were recorded: a pool of their own).
        generation_id VARCHAR,
        settings_sha256 VARCHAR NOT NULL DEFAULT '',
        PRIMARY KEY (example_id, model_fingerprint, probe_id, settings_sha256))""",
    # Stores from before these columns existed gain them here (and the key in _upgrade_score_key).
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS answer_verdict VARCHAR",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        model_fingerprint VARCHAR,
        probe_id VARCHAR,
        params JSON,
        counts JSON,
        status VARCHAR NOT NULL)""",
    # Shard files merged by `curate ingest`, by content digest: ingesting again is a no-op.
    """CREATE TABLE IF NOT EXISTS ingested (
        digest VARCHAR PRIMARY KEY,
        file VARCHAR NOT NULL,
        rows INTEGER NOT NULL,
        ingested_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        source VARCHAR NOT NULL,
        line INTEGER NOT NULL,
        reason VARCHAR NOT NULL,
        raw VARCHAR,
        run_id VARCHAR,
        quarantined_at TIMESTAMP NOT NULL)""",
    # A quarantined row is known by (source, line, reason, digest of the raw row): a rerun over the
    # same file adds nothing, and neither does a night whose file only grew by appended rows.
    "ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS raw_sha256 VARCHAR",
    # Every id and category a piece of content arrived under (the example row keeps the first).
    """CREATE TABLE IF NOT EXISTS example_aliases (
        example_id VARCHAR NOT NULL,
        source_id VARCHAR,
        source VARCHAR,
        category VARCHAR,
        added_at TIMESTAMP NOT NULL)""",
    # The model's own generations, so that a new probe scores from them with a teacher-forced pass
    # only. Keyed by (prompt, model, generation settings): changed settings never reuse a generation.
    """CREATE TABLE IF NOT EXISTS generations (
        generation_id VARCHAR PRIMARY KEY,
        prompt_sha256 VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        settings_sha256 VARCHAR NOT NULL,
        settings JSON NOT NULL,
        prompt_ids INTEGER[] NOT NULL,
        generated_ids INTEGER[] NOT NULL,
        text VARCHAR NOT NULL,
        close_index INTEGER,
        created_at TIMESTAMP NOT NULL,
        run_id VARCHAR)""",
    # The generation a score was read from (NULL on rows scored before generations were stored).
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS generation_id VARCHAR",
    # A store written before these columns and tables existed is upgraded in place, once: old
    # quarantine rows get their digest, old examples their first alias (so ids they declared are known).
    "UPDATE quarantine SET raw_sha256 = sha256(coalesce(raw, '')) WHERE raw_sha256 IS NULL",
    """INSERT INTO example_aliases (example_id, source_id, source, category, added_at)
       SELECT id, json_extract_string(extra, '$.source_id'), source, category, added_at FROM examples
       WHERE (SELECT count(*) FROM example_aliases) = 0""",
)

# A DuckDB file carries this magic at byte 8; anything else is refused before DuckDB opens it.
_DUCKDB_MAGIC = b"DUCK"


class StoreError(ValueError):
    """The store cannot be used: not a DuckDB file, locked by another writer, a bad path."""


def _raw_digest(raw: str) -> str:
    """sha256 of the row as stored; the same as DuckDB's ``sha256(raw)`` over the stored text."""
    return hashlib.sha256(_safe_text(raw).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ScoreRow:
    example_id: str
    model_fingerprint: str
    probe_id: str
    metrics: CliffMetrics
    closed: bool
    reasoning: str
    trace: list[float]
    run_id: str
    answer_verdict: str | None = None
    generation_id: str | None = None
    settings_sha256: str = ""  # digest of the generation settings ('' : not recorded)


@dataclass(frozen=True)
class GenerationRow:
    """One stored generation: the model's continuation of one rendered prompt under one set of
    generation settings (``settings`` as JSON, ``settings_sha256`` its digest)."""

    generation_id: str
    prompt_sha256: str
    model_fingerprint: str
    settings_sha256: str
    settings: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    close_index: int | None
    run_id: str | None = None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Store:
    """A handle on one DuckDB file (use as a context manager).

    Readers and a writer share the file. A writer holds an exclusive lock
    (``DB.lock`` beside the file) for its whole life, so a second writer is
    refused at once; but it holds DuckDB's own connection only while it works
    on the store (``release`` closes it between commits), so readers get in
    between the writer's commits. Either side waits up to ``wait_s`` seconds
    for the other's connection to close, with a message, then fails clearly.
    """

    def __init__(self, path: str | Path, read_only: bool = False, *, wait_s: float = 120.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = _checked_path(path, read_only)
        self.read_only = read_only
        self.wait_s = wait_s
        self.on_wait = on_wait
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock: IO[str] | None = None
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _writer_lock(self.path)
        try:
            con = self.con
            if read_only:
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                if "runs" not in tables:
                    raise StoreError(f"store {self.path} is a DuckDB database but not a curate store (no 'runs' table"
                                     f"{'; it has no tables at all' if not tables else ''}): score or import into it first")
            else:
                for statement in SCHEMA:
                    con.execute(statement)
                _upgrade_score_key(con)
        except BaseException:
            self.close()
            raise

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = self._connect()
        return self._con

    def _connect(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.wait_s
        told = False
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=self.read_only)
                con.execute("SET enable_progress_bar = false")  # DuckDB's own bar would write into curate's stdout
                return con
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise StoreError(explain_store_error(self.path, exc)) from None
                if time.monotonic() >= deadline:
                    raise StoreError(f"store {self.path} stayed busy for {self.wait_s:.0f} s "
                                     f"(another process holds it open); try again later") from None
                if not told and self.on_wait is not None:
                    self.on_wait(f"store {self.path} is busy (another process is committing); waiting up to {self.wait_s:.0f} s")
                    told = True
                time.sleep(0.1)
            except duckdb.Error as exc:
                raise StoreError(explain_store_error(self.path, exc)) from None

    def release(self) -> None:
        """Close the DuckDB connection (a writer keeps its lock); the next use opens it again."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def close(self) -> None:
        self.release()
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # runs -----------------------------------------------------------------
    def start_run(self, run_id: str, kind: str, params: dict[str, Any], model_fingerprint: str | None = None, probe_id: str | None = None) -> None:
        self.con.execute(
            "INSERT INTO runs (run_id, kind, started_at, model_fingerprint, probe_id, params, status) VALUES (?, ?, ?, ?, ?, ?, 'running')",
            [run_id, kind, _now(), model_fingerprint, probe_id, json.dumps(params)],
        )

    def running_runs(self) -> list[tuple[str, str, str]]:
        """(run id, kind, started at) of runs still marked running: in progress, or cut off by a kill."""
        rows = self.con.execute("SELECT run_id, kind, CAST(started_at AS VARCHAR) FROM runs WHERE status = 'running' "
                                "ORDER BY started_at DESC").fetchall()
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def finish_run(self, run_id: str, counts: dict[str, Any], status: str = "done") -> None:
        self.con.execute(
            "UPDATE runs SET finished_at = ?, counts = ?, status = ? WHERE run_id = ?",
            [_now(), json.dumps(counts), status, run_id],
        )

    # examples and quarantine ---------------------------------------------
    def add_examples(self, records: Sequence[CandidateRecord]) -> int:
        """Insert new examples, and every (id, source, category) each arrived under as an alias
        (repeats of known content included); returns how many examples were new."""
        if not records:
            return 0
        before = self.count("examples")
        now = _now()
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._insert_rows(
                "INSERT OR IGNORE", "examples", ("id", "prompt", "response", "category", "source", "extra", "added_at"),
                [[r.id, r.prompt, r.response, r.category, r.source, json.dumps(r.extra), now] for r in records if not r.repeat],
                casts={"extra": "JSON"},
            )
            # One set-based statement per chunk (a statement per alias cost seconds per thousand rows).
            aliases = sorted({(r.id, r.source_id, r.source, r.category) for r in records}, key=str)
            self.con.execute(
                "INSERT INTO example_aliases (example_id, source_id, source, category, added_at) "
                "SELECT n.example_id, n.source_id, n.source, n.category, ? FROM "
                "(SELECT unnest(?) AS example_id, unnest(?) AS source_id, unnest(?) AS source, unnest(?) AS category) n "
                "WHERE NOT EXISTS (SELECT 1 FROM example_aliases a WHERE a.example_id = n.example_id "
                "AND a.source_id IS NOT DISTINCT FROM n.source_id AND a.source IS NOT DISTINCT FROM n.source "
                "AND a.category IS NOT DISTINCT FROM n.category)",
                [now, *(list(column) for column in zip(*aliases, strict=True))],
            )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        return self.count("examples") - before

    def add_quarantine(self, rows: Iterable[QuarantinedRow], run_id: str | None) -> int:
        """Record bad rows not recorded before (by source, line, reason and raw digest); returns how many were new."""
        now = _now()
        data, seen = [], set()
        for q in rows:
            key = (q.source, q.line, q.reason, _raw_digest(q.raw))
            if key not in seen:
                seen.add(key)
                data.append([*key, _safe_text(q.raw), run_id, now])
        if not data:
            return 0
        before = self.count("quarantine")
        self.con.execute("BEGIN TRANSACTION")
        try:
            for source, line, reason, digest, raw, run, at in data:
                self.con.execute(
                    "INSERT INTO quarantine (source, line, reason, raw_sha256, raw, run_id, quarantined_at) "
                    "SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM quarantine "
                    "WHERE source = ? AND line = ? AND reason = ? AND raw_sha256 = ?)",
                    [source, line, reason, digest, raw, run, at, source, line, reason, digest],
                )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        return self.count("quarantine") - before

    # aliases ---------------------------------------------------------------
    def reused_ids(self, records: Sequence[CandidateRecord]) -> dict[str, str]:
        """Of the ids the records declare, those the store already holds for other content:
        declared id -> the example it names."""
        declared = {r.source_id: r.id for r in records if r.source_id is not None}
        if not declared:
            return {}
        known = self.con.execute(
            "SELECT DISTINCT source_id, example_id FROM example_aliases WHERE source_id IN (SELECT unnest(?))",
            [sorted(declared)],
        ).fetchall()
        return {sid: eid for sid, eid in known if declared.get(sid) not in (None, eid)}

    def aliases(self, example_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT example_id, source_id, source, category FROM example_aliases "
            "WHERE CAST(? AS VARCHAR[]) IS NULL OR example_id IN (SELECT unnest(?)) ORDER BY example_id, added_at, source_id",
            [None if example_ids is None else list(example_ids)] * 2,
        ).fetchall()
        return [dict(zip(("example_id", "source_id", "source", "category"), r, strict=True)) for r in rows]

    def count(self, table: str) -> int:
        if table not in {"examples", "scores", "runs", "quarantine", "ingested", "example_aliases", "generations"}:
            raise ValueError(f"unknown table {table!r}")
        # Table name from the fixed set above; fetchall completes the result (DuckDB 2 refuses
        # some later calls, such as register, while a result is still open).
        rows = self.con.execute(f"SELECT count(*) FROM {table}").fetchall()
        return int(rows[0][0]) if rows else 0

    # scores ---------------------------------------------------------------
    def unscored_ids(
        self, ids: Sequence[str], model_fingerprint: str, probe_id: str, need_verdict: bool = False, settings_sha256: str = ""
    ) -> list[str]:
        """Of ``ids``, those with no score row for this model, probe and generation settings
        (order kept); with ``need_verdict``, also those scored without an answer verdict."""
        if not ids:
            return []
        scored = {
            r[0]
            for r in self.con.execute(
                "SELECT example_id FROM scores WHERE model_fingerprint = ? AND probe_id = ? AND settings_sha256 = ? "
                "AND example_id IN (SELECT unnest(?)) AND (NOT ? OR answer_verdict IS NOT NULL)",
                [model_fingerprint, probe_id, settings_sha256, list(ids), need_verdict],
            ).fetchall()
        }
        return [i for i in ids if i not in scored]

    def add_scores(self, rows: Sequence[ScoreRow], replace: bool = False) -> None:
        """Insert one batch of score rows atomically (all or nothing). Existing
        keys are kept, or overwritten with ``replace`` (adding answer verdicts)."""
        now = _now()
        data = [
            [r.example_id, r.model_fingerprint, r.probe_id, m.plateau, m.final, m.misalignment, m.cliff_position,
             m.cliff_relative, m.steepness, m.n_tokens, r.closed, r.reasoning, r.trace, now, r.run_id, r.answer_verdict,
             r.generation_id, r.settings_sha256]
            for r, m in ((row, row.metrics) for row in rows)
        ]
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._insert_rows(
                "INSERT OR REPLACE" if replace else "INSERT OR IGNORE", "scores",
                (*_SCORE_COLUMNS, "settings_sha256"),
                data, casts={"trace": "FLOAT[]", "answer_verdict": "VARCHAR", "generation_id": "VARCHAR"},
            )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    # generations -----------------------------------------------------------
    def stored_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRow]:
        """The stored generations among ``generation_ids``."""
        if not generation_ids:
            return {}
        rows = self.con.execute(
            "SELECT generation_id, prompt_sha256, model_fingerprint, settings_sha256, settings, prompt_ids, generated_ids, text, "
            "close_index, run_id FROM generations WHERE generation_id IN (SELECT unnest(?))", [sorted(set(generation_ids))],
        ).fetchall()
        return {r[0]: GenerationRow(r[0], r[1], r[2], r[3], r[4], list(r[5]), list(r[6]), r[7], r[8], r[9]) for r in rows}

    def add_generations(self, rows: Sequence[GenerationRow]) -> None:
        """Store generations (one statement; an id already stored, or given twice, is kept once)."""
        rows = list({g.generation_id: g for g in rows}.values())
        now = _now()
        self._insert_rows(
            "INSERT OR IGNORE", "generations",
            ("generation_id", "prompt_sha256", "model_fingerprint", "settings_sha256", "settings", "prompt_ids", "generated_ids",
             "text", "close_index", "created_at", "run_id"),
            [[g.generation_id, g.prompt_sha256, g.model_fingerprint, g.settings_sha256, g.settings, g.prompt_ids,
              g.generated_ids, _safe_text(g.text), g.close_index, now, g.run_id] for g in rows],
            casts={"settings": "JSON", "prompt_ids": "INTEGER[]", "generated_ids": "INTEGER[]", "close_index": "INTEGER",
                   "run_id": "VARCHAR"},
        )

    def replace_generations(self, rows: Sequence[GenerationRow]) -> None:
        """Store these generations in place of the ones stored under the same ids (``--replace``)."""
        if not rows:
            return
        self.con.execute("DELETE FROM generations WHERE generation_id IN (SELECT unnest(?))", [[g.generation_id for g in rows]])
        self.add_generations(rows)

    def delete_generations(self, generation_ids: Sequence[str], run_id: str) -> None:
        """Remove generations that the run ``run_id`` stored (an import taking back a row it found doubtful)."""
        if generation_ids:
            self.con.execute("DELETE FROM generations WHERE generation_id IN (SELECT unnest(?)) AND run_id = ?",
                             [list(generation_ids), run_id])

    def _insert_rows(self, verb: str, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                     casts: dict[str, str] | None = None) -> None:
        """Insert many rows in one statement: each column travels as one list parameter and is
        unnested (``executemany`` runs a statement per row: 4 s per thousand rows on 2 cores,
        hours on a million-row night). Table, columns and casts are fixed names from this module."""
        if not rows:
            return
        casts = casts or {}
        select = ", ".join(f"CAST(unnest(?) AS {casts[c]})" if c in casts else "unnest(?)" for c in columns)
        self.con.execute(f"{verb} INTO {table} ({', '.join(columns)}) SELECT {select}",
                         [list(column) for column in zip(*rows, strict=True)])

    def score_keys(self) -> list[tuple[str, str, str, int, datetime]]:
        """(model_fingerprint, probe_id, settings_sha256, n_rows, last scored) per pool, newest first."""
        return [
            (r[0], r[1], r[2], int(r[3]), r[4])
            for r in self.con.execute(
                "SELECT model_fingerprint, probe_id, settings_sha256, count(*), max(scored_at) FROM scores "
                "GROUP BY model_fingerprint, probe_id, settings_sha256 ORDER BY max(scored_at) DESC"
            ).fetchall()
        ]

    def pool_format(self, model_fingerprint: str, settings_sha256: str) -> dict[str, Any] | None:
        """How the pool's completions are written (family, thinking format, end tokens), as the
        newest run that scored or imported it recorded it; for a pool scored before runs recorded
        it, the thinking format from its generations' settings (no end tokens known). None when
        neither says."""
        row = self.con.execute(
            "SELECT json_extract(params, '$.completion_format') FROM runs WHERE model_fingerprint = ? "
            "AND json_extract_string(params, '$.generation_settings_sha256') = ? "
            "AND json_extract(params, '$.completion_format') IS NOT NULL ORDER BY started_at DESC LIMIT 1",
            [model_fingerprint, settings_sha256]).fetchone()
        if row and row[0]:
            return json.loads(row[0])
        row = self.con.execute(
            "SELECT json_extract(g.settings, '$.format') FROM scores s JOIN generations g ON s.generation_id = g.generation_id "
            "WHERE s.model_fingerprint = ? AND s.settings_sha256 = ? LIMIT 1", [model_fingerprint, settings_sha256]).fetchone()
        if row and row[0]:
            return {"family": None, "thinking": json.loads(row[0]), "end_tokens": []}
        return None

    # Orderings a selection may use; fixed strings, never user input, because
    # they are spliced into ORDER BY (values always travel as parameters).
    _ORDERS = {
        "cliff": "misalignment DESC, example_id",
        "low-final": "final ASC, example_id",
        "plateau": "plateau DESC, example_id",
        "id": "example_id",
        "sample": "md5(example_id || ':' || CAST($seed AS VARCHAR)), example_id",
    }

    def pool_summary(self, model_fingerprint: str, probe_id: str, as_of: datetime | None = None,
                     include_unclosed: bool = False, settings_sha256: str | None = None) -> tuple[int, str, int, dict[str, int]]:
        """(rows in the pool, an order-free hash of their key and score columns, pool rows without an
        answer verdict, rows left out and why); with ``as_of``, only rows scored by then (the pool a
        past selection saw). Non-finite scores are always left out, unclosed reasoning unless asked for."""
        row = self.con.execute(
            "SELECT count(*) FILTER (WHERE keep), "
            "bit_xor(hash(example_id, misalignment, plateau, final, coalesce(answer_verdict, ''))) FILTER (WHERE keep), "
            "count(*) FILTER (WHERE keep AND answer_verdict IS NULL), "
            "count(*) FILTER (WHERE NOT isfinite(misalignment)), count(*) FILTER (WHERE isfinite(misalignment) AND NOT closed AND NOT ?) "
            "FROM (SELECT *, isfinite(misalignment) AND (? OR closed) AS keep FROM scores WHERE model_fingerprint = ? AND probe_id = ? "
            "AND (CAST(? AS VARCHAR) IS NULL OR settings_sha256 = ?) "
            "AND (CAST(? AS TIMESTAMP) IS NULL OR scored_at <= CAST(? AS TIMESTAMP)))",
            [include_unclosed, include_unclosed, model_fingerprint, probe_id, settings_sha256, settings_sha256, as_of, as_of],
        ).fetchone()
        if not row:
            return 0, f"{0:016x}", 0, {"non_finite": 0, "unclosed": 0}
        n, digest, missing, non_finite, unclosed = (int(row[0]), row[1], int(row[2]), int(row[3]), int(row[4]))
        return n, f"{int(digest or 0):016x}", missing, {"non_finite": non_finite, "unclosed": unclosed}

    # Rankings by one score column: (column, descending). They get a pre-filter (see _rank_cut).
    _RANK_KEYS = {"cliff": ("misalignment", True), "low-final": ("final", False), "plateau": ("plateau", True)}
    _RANK_BUCKETS = 4096
    # The pool a selection reads: finite scores only (a NaN from an fp16 overflow or a broken
    # checkpoint would sort above every number), and closed reasoning unless asked for.
    _POOL_FILTER = (
        "model_fingerprint = $fp AND probe_id = $probe AND isfinite(misalignment) AND ($unclosed OR closed)"
        " AND (CAST($settings AS VARCHAR) IS NULL OR settings_sha256 = $settings)"
        " AND (NOT $exclude OR answer_verdict IS DISTINCT FROM 'refusal')"
        " AND (CAST($as_of AS TIMESTAMP) IS NULL OR scored_at <= CAST($as_of AS TIMESTAMP))"
    )

    def _rank_cut(self, order: str, limit: int, params: dict[str, object]) -> str:
        """An extra WHERE clause that keeps every row of the first ``limit`` by
        ``order`` and few others, so the exact ORDER BY … LIMIT sorts thousands of
        rows instead of the whole pool (10M rows: 1.7 s → 0.9 s on 2 cores).

        One pass buckets the column into equal-width bins by value (a histogram);
        walking the bins from the best end finds the first bin that completes
        ``limit`` rows, and every row in it or better is kept. The bin of a row is
        the same expression in both queries, so no row of the top ``limit`` can be
        cut; ties, NaN (DuckDB sorts it above every number) and ±inf are placed
        where ORDER BY puts them. Returns "" when a cut would not pay."""
        column, descending = self._RANK_KEYS[order]
        lo, hi, n = self.con.execute(
            f"SELECT min({column}) FILTER (WHERE isfinite({column})), max({column}) FILTER (WHERE isfinite({column})), "
            f"count(*) FROM scores WHERE {self._POOL_FILTER}", {k: params[k] for k in ("fp", "probe", "exclude", "as_of", "unclosed", "settings")},
        ).fetchone()
        if lo is None or n <= 4 * limit:
            return ""
        b = self._RANK_BUCKETS
        key, key_lo = (column, float(lo)) if descending else (f"-{column}", -float(hi))
        nan_bin = b if descending else -1
        bin_expr = (f"CASE WHEN isnan({column}) THEN {nan_bin} ELSE CAST(greatest(0, least({b - 1}, "
                    f"floor(({key} - $cut_lo) / $cut_span * {b}))) AS INTEGER) END")
        params.update(cut_lo=key_lo, cut_span=(float(hi) - float(lo)) or 1.0)
        counts = self.con.execute(
            f"SELECT {bin_expr} AS bin, count(*) FROM scores WHERE {self._POOL_FILTER} GROUP BY bin ORDER BY bin DESC",
            {k: params[k] for k in ("fp", "probe", "exclude", "as_of", "unclosed", "settings", "cut_lo", "cut_span")},
        ).fetchall()
        seen = 0
        for bin_index, count in counts:
            seen += count
            if seen >= limit:
                params["cut_bin"] = int(bin_index)
                return f" AND {bin_expr} >= $cut_bin"
        return ""

    def selection(
        self,
        model_fingerprint: str,
        probe_id: str,
        order: str,
        limit: int,
        *,
        seed: int = 0,
        exclude_refusals: bool = False,
        output_order: str | None = None,
        as_of: datetime | None = None,
        include_unclosed: bool = False,
        settings_sha256: str | None = None,
    ) -> list[tuple]:
        """The first ``limit`` scored examples by ``order``, joined to their content,
        as (example_id, prompt, response, category, source, misalignment, reasoning),
        in ``output_order`` (default: ``order``). One query: the ranking and the
        join run inside DuckDB and only the chosen rows come back."""
        if order not in self._ORDERS or (output_order is not None and output_order not in self._ORDERS):
            raise ValueError(f"unknown ordering {order!r}")
        inner = self._ORDERS[order]
        outer = self._ORDERS[output_order or order]
        params: dict[str, object] = {"fp": model_fingerprint, "probe": probe_id, "exclude": exclude_refusals, "limit": limit,
                                     "as_of": as_of, "unclosed": include_unclosed, "settings": settings_sha256}
        cut = self._rank_cut(order, limit, params) if order in self._RANK_KEYS else ""
        query = (
            "SELECT s.example_id, e.prompt, e.response, e.category, e.source, s.misalignment, s.reasoning FROM ("
            f"  SELECT example_id, misalignment, plateau, final, reasoning FROM scores WHERE {self._POOL_FILTER}{cut}"
            f"  ORDER BY {inner} LIMIT $limit"
            f") s JOIN examples e ON e.id = s.example_id ORDER BY {outer.replace('example_id', 's.example_id')}"
        )
        if "$seed" in query:  # DuckDB rejects named parameters a query does not use
            params["seed"] = seed
        return self.con.execute(query, params).fetchall()

    # shards ---------------------------------------------------------------
    def shard_ingested(self, digest: str) -> bool:
        return self.con.execute("SELECT count(*) FROM ingested WHERE digest = ?", [digest]).fetchall()[0][0] > 0

    def _ingest(self, frame: Any, statements: Sequence[str], file: str, digest: str) -> int:
        """Run ``statements`` over ``frame`` (registered as ``shard``) in one transaction; returns new score rows."""
        before = self.count("scores")
        self.con.register("shard", frame)
        self.con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                self.con.execute(statement)
            self.con.execute("INSERT INTO ingested (digest, file, rows, ingested_at) VALUES (?, ?, ?, ?)",
                             [digest, file, frame.height, _now()])
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self.con.unregister("shard")
        return self.count("scores") - before

    def ingest_score_frame(self, frame: Any, file: str, digest: str) -> int:
        return self._ingest(frame, (
            """INSERT OR IGNORE INTO examples (id, prompt, response, category, source, extra, added_at)
               SELECT DISTINCT ON (example_id) example_id, prompt, response, category, source, CAST(extra AS JSON), scored_at
               FROM shard""",
            # Shards written before generation settings were recorded have neither column.
            f"""INSERT OR IGNORE INTO scores (example_id, model_fingerprint, probe_id, plateau, final, misalignment,
                   cliff_position, cliff_relative, steepness, n_tokens, closed, reasoning, trace, scored_at, run_id, answer_verdict,
                   generation_id, settings_sha256)
               SELECT example_id, model_fingerprint, probe_id, plateau, final, misalignment, cliff_position, cliff_relative,
                   steepness, n_tokens, closed, reasoning, CAST(trace AS FLOAT[]), scored_at, run_id, answer_verdict,
                   {"generation_id" if "generation_id" in frame.columns else "NULL"},
                   {"settings_sha256" if "settings_sha256" in frame.columns else "''"}
               FROM shard""",
            """INSERT INTO example_aliases (example_id, source_id, source, category, added_at)
               SELECT DISTINCT example_id, json_extract_string(CAST(extra AS JSON), '$.source_id'), source, category, scored_at
               FROM shard q WHERE NOT EXISTS (
                   SELECT 1 FROM example_aliases a WHERE a.example_id = q.example_id AND a.source IS NOT DISTINCT FROM q.source
                   AND a.category IS NOT DISTINCT FROM q.category
                   AND a.source_id IS NOT DISTINCT FROM json_extract_string(CAST(q.extra AS JSON), '$.source_id'))""",
        ), file, digest)

    def ingest_quarantine_frame(self, frame: Any, file: str, digest: str) -> int:
        self._ingest(frame, ("""INSERT INTO quarantine (source, line, reason, raw, raw_sha256, run_id, quarantined_at)
                                SELECT DISTINCT ON (source, line, reason, sha256(coalesce(raw, '')))
                                       source, line, reason, raw, sha256(coalesce(raw, '')), run_id, quarantined_at
                                FROM shard q WHERE NOT EXISTS (
                                    SELECT 1 FROM quarantine o WHERE o.source = q.source AND o.line = q.line
                                    AND o.reason = q.reason AND o.raw_sha256 = sha256(coalesce(q.raw, '')))""",), file, digest)
        return frame.height

    def status(self) -> dict[str, list[dict[str, Any]]]:
        """Counts for ``curate status``: examples per source, scores per (model,
        probe), quarantined rows per reason, and the latest runs."""

        def rows(sql: str, columns: Sequence[str]) -> list[dict[str, Any]]:
            return [dict(zip(columns, r, strict=True)) for r in self.con.execute(sql).fetchall()]

        return {
            "sources": rows("SELECT coalesce(source, '(none)') AS s, count(*) FROM examples GROUP BY s ORDER BY s",
                            ("source", "examples")),
            "scores": rows(
                """SELECT model_fingerprint, probe_id, left(settings_sha256, 12), count(*), count(DISTINCT run_id), max(scored_at)
                   FROM scores GROUP BY model_fingerprint, probe_id, settings_sha256 ORDER BY max(scored_at) DESC""",
                ("model_fingerprint", "probe_id", "generation_settings", "scores", "runs", "last_scored_at")),
            "unscored": rows(
                """SELECT m.model_fingerprint, m.probe_id, left(m.settings_sha256, 12), count(e.id)
                   FROM (SELECT DISTINCT model_fingerprint, probe_id, settings_sha256 FROM scores) m CROSS JOIN examples e
                   WHERE NOT EXISTS (SELECT 1 FROM scores s WHERE s.example_id = e.id
                                     AND s.model_fingerprint = m.model_fingerprint AND s.probe_id = m.probe_id
                                     AND s.settings_sha256 = m.settings_sha256)
                   GROUP BY m.model_fingerprint, m.probe_id, m.settings_sha256""",
                ("model_fingerprint", "probe_id", "generation_settings", "unscored_examples")),
            "quarantine": rows(
                # The reason's leading words ("malformed JSON", "not UTF-8", "duplicate id") group it.
                """SELECT source, trim(regexp_extract(reason, '^[^:(]+')) AS why, count(*) FROM quarantine
                   GROUP BY source, why ORDER BY source, why""",
                ("source", "reason", "rows")),
            "runs": rows(
                """SELECT left(run_id, 12), kind, status, date_trunc('second', started_at),
                          round(epoch(finished_at - started_at), 1), counts
                   FROM runs ORDER BY started_at DESC LIMIT 20""",
                ("run", "kind", "status", "started_at", "seconds", "counts")),
        }

    def misalignment_quantiles(self, model_fingerprint: str, probe_id: str, as_of: datetime | None = None,
                               settings_sha256: str | None = None, include_unclosed: bool = False) -> list[float | None]:
        """Min, quartiles and max of MS over the pool (the rows ``pool_summary`` counts). Exact: on 10M
        rows DuckDB's exact quantiles cost what its t-digest does (0.4 s on 2 cores), and the
        t-digest's min and max were off by 1%. Runs on its own cursor, so that a caller may run it in a
        thread beside its own work (DuckDB releases the GIL while it computes)."""
        cursor = self.con.cursor()
        try:
            row = cursor.execute(
                "SELECT quantile_cont(misalignment, [0, 0.25, 0.5, 0.75, 1]) FROM scores WHERE model_fingerprint = ? "
                "AND probe_id = ? AND (CAST(? AS VARCHAR) IS NULL OR settings_sha256 = ?) AND isfinite(misalignment) "
                "AND (? OR closed) AND (CAST(? AS TIMESTAMP) IS NULL OR scored_at <= CAST(? AS TIMESTAMP))",
                [model_fingerprint, probe_id, settings_sha256, settings_sha256, include_unclosed, as_of, as_of],
            ).fetchone()
        finally:
            cursor.close()
        return list(row[0]) if row and row[0] is not None else [None] * 5

    def score_inputs(self, model_fingerprint: str, probe_id: str) -> list[dict[str, Any]]:
        """The source files (path, sha256) that scoring runs of this model and probe read."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for (params,) in self.con.execute(
            "SELECT params FROM runs WHERE kind = 'score' AND model_fingerprint = ? AND probe_id = ? ORDER BY started_at",
            [model_fingerprint, probe_id],
        ).fetchall():
            for item in (json.loads(params) if params else {}).get("inputs", []):
                seen.setdefault((item["path"], item["sha256"]), item)
        return list(seen.values())

    def categories(self, ids: Sequence[str]) -> dict[str, str | None]:
        """example id -> category, for ``ids``."""
        return dict(self.con.execute("SELECT id, category FROM examples WHERE id IN (SELECT unnest(?))", [list(ids)]).fetchall())

    def category_share(self, model_fingerprint: str, probe_id: str, categories: Sequence[str],
                       settings_sha256: str | None = None) -> float | None:
        """Share of the scored pool whose category is one of ``categories``."""
        row = self.con.execute(
            "SELECT avg(CASE WHEN e.category IN (SELECT unnest(?)) THEN 1.0 ELSE 0.0 END) FROM scores s "
            "JOIN examples e ON e.id = s.example_id WHERE s.model_fingerprint = ? AND s.probe_id = ? "
            "AND (CAST(? AS VARCHAR) IS NULL OR s.settings_sha256 = ?)",
            [sorted(categories), model_fingerprint, probe_id, settings_sha256, settings_sha256],
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def fill_synthetic(self, rows: int, trace_tokens: int = 1, reasoning_chars: int = 9) -> None:
        """``rows`` made-up examples and scores (random MS), for the selection and store benchmarks:
        each with a ``trace_tokens``-long random trace and ``reasoning_chars`` of reasoning text
        (varied words, so it compresses about as well as prose, not as well as one repeated string)."""
        self.con.execute(
            "INSERT INTO examples SELECT 'ex' || i, 'prompt ' || i, 'reasoning</think>I cannot help.', NULL, 'bench', '{}', now() "
            "FROM range(?) t(i)", [rows])
        # What a scoring run leaves beside its rows, so that reading the store costs what it costs a
        # real one: each example's first alias, and the run that recorded the pool's completion format.
        self.con.execute("INSERT INTO example_aliases (example_id, source_id, source, category, added_at) "
                         "SELECT id, NULL, source, category, added_at FROM examples WHERE source = 'bench'")
        self.start_run("bench-fill", "score", {"generation_settings_sha256": "", "completion_format": {
            "family": None, "thinking": asdict(ThinkingFormat()), "end_tokens": ["<|im_end|>"]}}, "fp", "probe")
        self.finish_run("bench-fill", {"scored": rows})
        self.con.execute(
            "INSERT INTO scores SELECT 'ex' || i, 'fp', 'probe', p, f, p - f, 0, 0.5, 0.1, ?, true, "
            "left(array_to_string(list_transform(range(? // 2 + 1), lambda w: ['the', 'user', 'asks', 'about', 'a', 'risky', "
            "'topic', 'so', 'I', 'should', 'refuse', 'carefully'][((i * 7 + w * 13) % 12) + 1]), ' '), ?), "
            "list_transform(range(?), lambda k: (p - (p - f) * (k > ? * 0.9)::INT + random() * 0.02)::FLOAT), now(), 'bench', NULL, "
            "NULL, '' "
            "FROM (SELECT i, random() AS p, random() AS f FROM range(?) t(i))",
            [trace_tokens, reasoning_chars, reasoning_chars, trace_tokens, trace_tokens, rows])

    def traces(self, model_fingerprint: str, probe_id: str,
               settings_sha256: str | None = None) -> list[tuple[str, str | None, float, list[float]]]:
        """(example_id, category, misalignment, trace) for plotting."""
        return [
            (r[0], r[1], float(r[2]), list(r[3]))
            for r in self.con.execute(
                "SELECT s.example_id, e.category, s.misalignment, s.trace FROM scores s JOIN examples e ON e.id = s.example_id "
                "WHERE s.model_fingerprint = ? AND s.probe_id = ? AND (CAST(? AS VARCHAR) IS NULL OR s.settings_sha256 = ?) "
                "ORDER BY s.misalignment DESC, s.example_id",
                [model_fingerprint, probe_id, settings_sha256, settings_sha256],
            ).fetchall()
        ]


_SCORE_COLUMNS = ("example_id", "model_fingerprint", "probe_id", "plateau", "final", "misalignment", "cliff_position",
                  "cliff_relative", "steepness", "n_tokens", "closed", "reasoning", "trace", "scored_at", "run_id",
                  "answer_verdict", "generation_id")


def _upgrade_score_key(con: duckdb.DuckDBPyConnection) -> None:
    """A store written before scores were keyed by generation settings: its score table is rebuilt
    once with the new key, every old row in the '' (unrecorded settings) pool, in one transaction."""
    columns = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'scores'").fetchall()}
    if "settings_sha256" in columns:
        return
    names = ", ".join(_SCORE_COLUMNS)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("ALTER TABLE scores RENAME TO scores_before_settings")
        con.execute(next(s for s in SCHEMA if s.startswith("CREATE TABLE IF NOT EXISTS scores")))  # as created today
        con.execute(f"INSERT INTO scores ({names}, settings_sha256) SELECT {names}, '' FROM scores_before_settings")
        con.execute("DROP TABLE scores_before_settings")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def _safe_text(text: str) -> str:
    """Text DuckDB can store: a lone surrogate (valid in JSON, not in UTF-8) becomes U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _checked_path(path: str | Path, read_only: bool) -> Path:
    if not str(path).strip():
        raise StoreError("--db is empty: give the path of a DuckDB file")
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"store {p} is a directory, not a DuckDB file")
    if read_only and not p.exists():
        raise StoreError(f"store not found: {p}")
    if p.exists() and not os.access(p, os.R_OK):
        raise StoreError(f"store {p}: permission denied (this user cannot read it; check its owner and mode)")
    if not read_only:
        if p.exists() and not os.access(p, os.W_OK):
            raise StoreError(f"store {p}: permission denied (this user cannot write it; a read-only verb such as "
                             "`curate status` or `curate select` can still read it)")
        folder = next((d for d in (p.parent, *p.parent.parents) if d.exists()), None)
        if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"store {p}: permission denied on {folder} (a writer needs it writable: DuckDB keeps "
                             "its write-ahead log and curate its lock file beside the store)")
    if p.exists() and p.stat().st_size > 0:
        with p.open("rb") as fh:
            head = fh.read(12)
        if head[8:12] != _DUCKDB_MAGIC:
            raise StoreError(f"store {p} is not a readable DuckDB database (corrupt, truncated or another kind of file); "
                             "it was left untouched")
    return p


def explain_store_error(path: Path | str, exc: BaseException) -> str:
    """What a DuckDB error on the store means, in words a user can act on."""
    text = str(exc)
    lowered = text.lower()
    if "no space left" in lowered or "disk is full" in lowered or "enospc" in lowered:
        return f"no space left on the device holding the store {path}; free some space and re-run (nothing was committed): {text}"
    if "permission denied" in lowered or "read-only file system" in lowered:
        return f"store {path}: permission denied ({text})"
    return f"store {path} is not a readable DuckDB database (corrupt, truncated or another kind of file): {text}"


def _lock_path(path: Path) -> Path:
    # Named from the resolved file: a symlink (or a relative path) to the same store must contend
    # for the same lock, or two writers run at once on one file.
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def writer_holding(path: Path) -> str | None:
    """Who holds the store's writer lock right now ("pid … since …"), or None when no one does.
    Probed with a non-blocking lock taken and dropped at once, so it never waits nor blocks a writer."""
    lock_path = _lock_path(path)
    if not lock_path.exists():
        return None
    try:
        with lock_path.open("r", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "a curate process"
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def _writer_lock(path: Path) -> IO[str]:
    """An exclusive lock for the one writer, taken at once or refused, never waited for: a
    nightly job that silently queues behind a stuck one hides the problem."""
    fh = _lock_path(path).open("a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise StoreError(f"store {path} is in use by another process: a curate job is writing it ({holder}); "
                         "one writer at a time (DuckDB allows one writer)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
    fh.flush()
    return fh
