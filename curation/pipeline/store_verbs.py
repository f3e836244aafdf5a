"""The verbs that look after a store: merge shards into it (ingest) and say what it holds (status)."""

from __future__ import annotations

import json

from rich.table import Table

from curation.cli.options import Option
from curation.cli.verb import Output, Settings, Verb, console, out_console


def _cell_text(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, str) and value.startswith("{"):
        try:  # run counts: one short line of k=v
            return " ".join(f"{k}={v}" for k, v in json.loads(value).items())
        except json.JSONDecodeError:
            return value
    return str(value)


def run_ingest(s: Settings) -> int:
    from curation.pipeline.shards import ingest_shards
    from curation.pipeline.store import Store

    with Store(s["db"]) as store:
        counts = ingest_shards(store, [d.strip() for d in s["shards"].split(",") if d.strip()])
    out_console.print(
        f"ingested {counts['files']} files ({counts['skipped_files']} already ingested): {counts['new_scores']} new score rows "
        f"of {counts['score_rows']} read, {counts['quarantined']} quarantined rows")
    return 0


INGEST_VERB = Verb("ingest", "merge Parquet shards from curate score --shard into a store (idempotent)", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--shards", str, None, "comma-separated shard folders (each --shard-dir)", required=True),
], run_ingest,
    outputs=(Output("--db", appends=True),), inputs=("--shards",))


def run_status(s: Settings) -> int:
    from curation.pipeline.store import Store

    with Store(s["db"], read_only=True, on_wait=lambda m: console.print(m, soft_wrap=True, markup=False)) as store:
        status = store.status()
    if s["json"]:
        out_console.print_json(json.dumps(status, default=str))
        return 0
    for name, rows in status.items():
        table = Table(title=f"{name} ({len(rows)})")
        columns = list(rows[0]) if rows else ["(none)"]
        for col in columns:
            table.add_column(col.replace("_", " "))
        for r in rows:
            table.add_row(*[_cell_text(r[c]) for c in columns])
        out_console.print(table)
    return 0


STATUS_VERB = Verb("status", "counts per source, model/probe, quarantine reason and run in a store", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--json", None, False, "print JSON instead of tables"),
], run_status)
