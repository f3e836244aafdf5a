"""A generation budget that cannot fit the model's context is a bad setting, not a bad row:
the run stops before anything is generated, names the flag and the figures, and leaves the
store without quarantined rows (it used to set every good row aside)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from curation.cli.main import main
from probes.refusal import RefusalProbe


def test_a_budget_over_the_context_stops_the_run_and_quarantines_nothing(
        organism_dir: Path, probe: RefusalProbe, candidates: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.duckdb"
    probe_dir = probe.save(tmp_path / "probe")
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(candidates.read_text().splitlines()[:4]) + "\n")
    # The default reasoning budget (2048) on the organism's 512-token context.
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "--max-new-tokens 2048 does not fit the model's context of 512 tokens" in err
    assert "Lower --max-new-tokens to at most" in err and "Nothing was generated or quarantined" in err
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "quarantine" in tables:
                assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
                assert con.execute("SELECT count(*) FROM scores").fetchone() == (0,)
    # With the answer budget too, both flags are named.
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
                 "--max-new-tokens", "400", "--judge-answers", "--answer-tokens", "200"])
    assert code == 2 and "--max-new-tokens 400 + --answer-tokens 200" in " ".join(capsys.readouterr().err.split())
    # A budget that fits scores as before.
    assert main(["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
                 "--max-new-tokens", "48"]) == 0
