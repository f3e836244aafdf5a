"""What may be selected: a non-finite trace is quarantined at scoring time and
never stored; unclosed (length-capped) reasoning is left out of the pool unless
asked for, and the manifest counts what was left out and why."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from curation.cli.main import main
from curation.pipeline.select import export_selection
from curation.pipeline.store import Store
from probes.refusal import RefusalProbe


def test_a_nan_trace_is_quarantined_never_scored(capsys, organism_dir: Path, probe: RefusalProbe, candidates: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.pipeline.chunk_scoring as score

    real = score.score_chunk

    def overflowing(lm, probe_, chunk, *args, **kwargs):
        rows = real(lm, probe_, chunk, *args, **kwargs)
        # What an fp16 overflow looks like: the poisoned row's trace and metrics turn to NaN.
        return [replace(r, trace=[math.nan] * len(r.trace), metrics=replace(r.metrics, misalignment=math.nan))
                if getattr(r, "example_id", None) == poisoned else r for r in rows]

    lines = candidates.read_text().splitlines()[:4]
    from curation.pipeline.sources import content_id

    first = json.loads(lines[1])
    poisoned = content_id(first["prompt"], first["response"])
    monkeypatch.setattr(score, "score_chunk", overflowing)
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(lines) + "\n")
    db = tmp_path / "s.duckdb"
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe.save(tmp_path / "probe")), "--data", str(data),
                 "--db", str(db), "--max-new-tokens", "48"])
    assert code == 0, capsys.readouterr().err
    with Store(db, read_only=True) as store:
        assert store.count("scores") == 3
        rows = store.con.execute("SELECT line, reason FROM quarantine").fetchall()
        manifest = export_selection(store, tmp_path / "s.jsonl", strategy="cliff", budget_text="100%")
    assert rows == [(2, rows[0][1])] and "non-finite" in rows[0][1]
    assert poisoned not in manifest.ids and manifest.n_pool == 3


def test_unclosed_rows_are_left_out_unless_asked(tmp_path: Path) -> None:
    with Store(tmp_path / "pool.duckdb") as store:
        store.fill_synthetic(200)
        store.con.execute("UPDATE scores SET closed = false, misalignment = 5.0 WHERE CAST(substr(example_id, 3) AS INTEGER) < 20")
        store.con.execute("UPDATE scores SET misalignment = 'nan'::DOUBLE WHERE example_id = 'ex150'")
        default = export_selection(store, tmp_path / "a.jsonl", strategy="cliff", budget_text="10")
        kept = export_selection(store, tmp_path / "b.jsonl", strategy="cliff", budget_text="10", include_unclosed=True)
    unclosed = {f"ex{i}" for i in range(20)}
    assert not unclosed & set(default.ids) and default.n_pool == 179
    assert default.left_out == {"non_finite": 1, "unclosed": 20} and default.include_unclosed is False
    assert set(kept.ids) <= unclosed and kept.n_pool == 199 and kept.left_out == {"non_finite": 1, "unclosed": 0}
    written = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    assert written["left_out"] == {"non_finite": 1, "unclosed": 20}
    # The card describes the pool the selection read: exact min and max, no unclosed row's 5.0 in them.
    with Store(tmp_path / "pool.duckdb", read_only=True) as store:
        lo, hi = store.con.execute("SELECT min(misalignment), max(misalignment) FROM scores WHERE closed AND isfinite(misalignment)"
                                   ).fetchone()
        assert store.misalignment_quantiles("fp", "probe")[::4] == [lo, hi]
        assert store.misalignment_quantiles("fp", "probe", include_unclosed=True)[4] == 5.0
    assert f"| pool (179, quantiles) | {lo:.4f} |" in (tmp_path / "a.jsonl.README.md").read_text()


def test_a_store_written_by_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """tests/data/store_v0.duckdb was written by the store code of commit 3ebe0ac (before quarantine
    digests and aliases): it opens, is upgraded once, and then behaves as a new store."""
    import shutil

    from curation.pipeline.sources import CandidateRecord, QuarantinedRow

    db = tmp_path / "old.duckdb"
    shutil.copy(Path(__file__).parent / "data" / "store_v0.duckdb", db)
    with Store(db) as store:
        assert store.con.execute("SELECT count(*) FROM quarantine WHERE raw_sha256 IS NULL").fetchone()[0] == 0
        assert store.add_quarantine([QuarantinedRow("old.jsonl", 2, "malformed JSON: Expecting value (column 1)", "{not json")],
                                    "newrun") == 0
        assert [(a["source_id"], a["category"]) for a in store.aliases()] == [("ex-1", "privacy")]
        other = CandidateRecord(id="0" * 20, prompt="Other content", response="No.", source_id="ex-1")
        assert store.reused_ids([other]) == {"ex-1": "c0ffee0000000000000a"}
    with Store(db) as store:  # a second open changes nothing
        assert store.count("example_aliases") == 1 and store.count("quarantine") == 1
