"""``curate bench --stream``: peak memory of reading a large parquet pool through
the candidate reader, against loading the same pool whole, in the same run.

Each side runs in its own subprocess, so its peak resident memory is its own:
the reader over the full pool, the reader over a tenth of it (bounded memory
means the two peaks are about the same), and the whole-pool load a newcomer
would write (``polars.read_parquet`` then a list of dicts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from curation.experiments.process_memory import peak_rss_mb


def write_pool(path: Path, rows: int, row_group: int = 50_000) -> None:
    """A synthetic WildJailbreak-layout pool, written a row group at a time (never whole in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            idx = range(start, start + n)
            table = pa.table({
                "vanilla": [f"synthetic request {i}: how would one do the thing numbered {i}?" for i in idx],
                "adversarial": ["" if i % 2 else f"role-play wrapper around request {i}" for i in idx],
                "completion": [f"Let me think about request {i}. It is harmful.\n</think>\n\nI can't help with that." for i in idx],
                "data_type": ["vanilla_harmful" if i % 2 else "adversarial_harmful" for i in idx],
            })
            writer = writer or pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def worker(args: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    if args["side"] == "whole":
        import polars as pl

        rows = pl.read_parquet(args["pool"]).to_dicts()
        n = len(rows)
    else:
        from curation.pipeline.sources import CandidateRecord, iter_candidates
        from probes.layouts import Layout

        layout = Layout.from_flags("wildjailbreak", None, None)
        n = 0
        for item in iter_candidates(args["pool"], layout=layout):
            n += isinstance(item, CandidateRecord)
            if args.get("limit") and n >= args["limit"]:
                break
    seconds = time.perf_counter() - started
    return {"side": args["side"], "rows": n, "seconds": seconds, "rows_per_s": n / seconds if seconds else None,
            "peak_rss_mb": peak_rss_mb()}


def _run(args: dict[str, Any]) -> dict[str, Any]:
    code = "import json,sys; from curation.experiments.stream_bench import worker; print(json.dumps(worker(json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_stream_bench(rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.parquet"
        write_pool(pool, rows)
        size_mb = pool.stat().st_size / 2**20
        full = _run({"side": "stream", "pool": str(pool)})
        tenth = _run({"side": "stream", "pool": str(pool), "limit": max(1, rows // 10)})
        whole = _run({"side": "whole", "pool": str(pool)})
    return {
        "rows": rows, "pool_mb": size_mb, "stream": full, "stream_tenth": tenth, "whole_load": whole,
        "ratio_peak_full_over_tenth": full["peak_rss_mb"] / tenth["peak_rss_mb"],
        "ratio_peak_stream_over_whole_load": full["peak_rss_mb"] / whole["peak_rss_mb"],
    }
