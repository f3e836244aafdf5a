"""Stored generations: a second probe scores without generating, a prompt shared by
several candidates is generated once, changed generation settings never reuse a
generation, and a store written by the previous version is upgraded in place."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from curation.cli.main import main
from curation.pipeline.store import Store
from probes.refusal import RefusalProbe, compute_probe_id


def _second_probe(probe: RefusalProbe, out: Path) -> Path:
    weight = probe.weight.flip(0)
    meta = replace(probe.meta, probe_id=compute_probe_id(weight, probe.bias, probe.layer, probe.meta.model_fingerprint,
                                                         probe.meta.position))
    RefusalProbe(weight, probe.bias, meta).save(out)
    return out


def _score(capsys: pytest.CaptureFixture[str], organism_dir: Path, probe_dir: Path, data: Path, db: Path, *extra: str) -> dict:
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
                 "--max-new-tokens", "48", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def pool(candidates: Path, tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in candidates.read_text().splitlines()[:6]]
    # Two more candidates for the first prompt, with other responses: its trace depends on the prompt only.
    shared = [{**rows[0], "id": f"shared-{i}", "response": f"Another safe response, number {i}."} for i in range(2)]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + shared))
    return path


def test_a_second_probe_scores_from_stored_generations(capsys, organism_dir: Path, probe: RefusalProbe, pool: Path,
                                                       tmp_path: Path) -> None:
    first_dir = probe.save(tmp_path / "probe-a")
    second_dir = _second_probe(probe, tmp_path / "probe-b")
    db = tmp_path / "s.duckdb"
    first = _score(capsys, organism_dir, first_dir, pool, db)
    assert first["n_scored"] == 8 and first["n_generated"] == 6 and first["n_reused_generations"] == 2
    second = _score(capsys, organism_dir, second_dir, pool, db)
    assert second["n_scored"] == 8 and second["n_generated"] == 0 and second["n_reused_generations"] == 8
    # The same scores as a store that generated for the second probe itself.
    fresh = tmp_path / "fresh.duckdb"
    assert _score(capsys, organism_dir, second_dir, pool, fresh)["n_generated"] == 6
    query = "SELECT example_id, misalignment, trace FROM scores WHERE probe_id = ? ORDER BY example_id"
    second_id = RefusalProbe.load(second_dir).probe_id
    with duckdb.connect(str(db), read_only=True) as a, duckdb.connect(str(fresh), read_only=True) as b:
        reused, generated = a.execute(query, [second_id]).fetchall(), b.execute(query, [second_id]).fetchall()
        shared = a.execute("SELECT count(DISTINCT generation_id), count(DISTINCT trace) FROM scores s JOIN examples e "
                           "ON s.example_id = e.id WHERE probe_id = ? GROUP BY e.prompt HAVING count(*) = 3",
                           [second_id]).fetchone()
    assert [r[0] for r in reused] == [r[0] for r in generated]
    assert all(abs(x[1] - y[1]) < 1e-6 for x, y in zip(reused, generated, strict=True))
    assert shared == (1, 1)  # the three candidates of one prompt: one generation, one trace


def test_changed_generation_settings_never_reuse_a_generation(capsys, organism_dir: Path, probe: RefusalProbe, pool: Path,
                                                              tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    first_dir = probe.save(tmp_path / "probe-a")
    second_dir = _second_probe(probe, tmp_path / "probe-b")
    first = _score(capsys, organism_dir, first_dir, pool, db)
    assert first["n_generated"] == 6
    # Another budget, then sampling: each is new generation work, never the stored 48-token greedy traces,
    # and its scores are a pool of their own beside the first.
    assert _score(capsys, organism_dir, second_dir, pool, db, "--max-new-tokens", "40")["n_generated"] == 6
    third = _score(capsys, organism_dir, first_dir, pool, db, "--temperature", "0.7", "--top-p", "0.9")
    assert third["n_scored"] == 8 and third["n_generated"] == 6 and third["n_already_scored"] == 0
    assert len({first["settings_sha256"], third["settings_sha256"]}) == 2
    assert _score(capsys, organism_dir, first_dir, pool, db)["n_already_scored"] == 8  # the first settings again: nothing to do
    with duckdb.connect(str(db), read_only=True) as con:
        budgets = con.execute("SELECT settings->>'$.max_new_tokens', count(*) FROM generations GROUP BY 1 ORDER BY 1").fetchall()
        pools = con.execute("SELECT probe_id, settings_sha256, count(*) FROM scores GROUP BY ALL").fetchall()
    assert budgets == [("40", 6), ("48", 12)] and len(pools) == 3 and all(n == 8 for *_, n in pools)
    # A selection reads one pool: the newest unless told which (a digest prefix will do).
    out = tmp_path / "slice.jsonl"
    assert main(["select", "--db", str(db), "--out", str(out), "--budget", "3", "--include-unclosed"]) == 0
    manifest = json.loads((tmp_path / "slice.jsonl.manifest.json").read_text())
    assert manifest["generation_settings"] == third["settings_sha256"] and manifest["n_pool"] == 8
    assert main(["select", "--db", str(db), "--out", str(out), "--budget", "3", "--include-unclosed", "--force",
                 "--generation-settings", first["settings_sha256"][:12]]) == 0
    assert json.loads((tmp_path / "slice.jsonl.manifest.json").read_text())["generation_settings"] == first["settings_sha256"]


def test_a_store_written_by_the_previous_version_gains_generations(capsys, organism_dir: Path, probe: RefusalProbe,
                                                                  pool: Path, tmp_path: Path) -> None:
    """tests/data/store_v1.duckdb was written by the store code of commit 3a82746 (no generations table, no
    generation ids on scores)."""
    db = tmp_path / "old.duckdb"
    shutil.copy(Path(__file__).parent / "data" / "store_v1.duckdb", db)
    with Store(db) as store:
        assert store.count("generations") == 0 and store.count("scores") == 4
        assert store.con.execute("SELECT count(*) FROM scores WHERE generation_id IS NULL").fetchone()[0] == 4
    result = _score(capsys, organism_dir, probe.save(tmp_path / "probe"), pool, db)
    assert result["n_generated"] == 6
    with Store(db) as store:
        assert store.count("scores") == 12 and store.count("generations") == 6
        # The old rows: a pool of their own (settings not recorded), still selectable as such.
        assert store.con.execute("SELECT count(*) FROM scores WHERE generation_id IS NULL AND settings_sha256 = ''").fetchone()[0] == 4
        old = [k for k in store.score_keys() if k[2] == ""]
        assert [(k[0], k[1], k[3]) for k in old] == [("fp0000000000000a", "probe00000000001", 4)]
    with Store(db) as store:  # a second open changes nothing
        assert store.count("scores") == 12


def test_imported_generations_are_checked_then_scored_without_generating(capsys, organism_dir: Path, probe: RefusalProbe,
                                                                           pool: Path, tmp_path: Path) -> None:
    prompts = sorted({json.loads(line)["prompt"] for line in pool.read_text().splitlines()})
    good = [{"prompt": p, "reasoning": f"The user asks: {p[:40]}. I should think about whether this is safe.",
             "settings": {"max_new_tokens": 48, "temperature": 0.0}} for p in prompts]
    bad = [
        {"prompt": prompts[0], "reasoning": ""},  # nothing to score
        {"prompt": prompts[0], "reasoning": "done </think> and an answer"},  # the close marker is ours to add
        {"prompt": prompts[0], "reasoning": "fine", "settings": {"max_new_tokens": 4096}},  # another budget
        {"prompt": prompts[0], "reasoning": " ".join(["word"] * 200)},  # longer than the budget
        ["not", "an", "object"],
    ]
    data = tmp_path / "generated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "{broken\n")
    db = tmp_path / "s.duckdb"
    code = main(["generations", "import", "--data", str(data), "--model", str(organism_dir), "--db", str(db),
                 "--max-new-tokens", "48", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["n_imported"] == len(prompts) and summary["n_quarantined"] == len(bad) + 1
    with Store(db, read_only=True) as store:
        reasons = sorted(r[0] for r in store.con.execute("SELECT reason FROM quarantine").fetchall())
    assert any("'reasoning' must be a non-empty string" in r for r in reasons)
    assert any("already holds the close marker" in r for r in reasons)
    assert any("max_new_tokens=4096" in r for r in reasons)
    assert any("over the declared --max-new-tokens 48" in r for r in reasons)
    assert any("malformed JSON" in r for r in reasons)
    # Scoring with the same settings reads the imported reasoning: no generation at all.
    result = _score(capsys, organism_dir, probe.save(tmp_path / "probe"), pool, db)
    assert result["n_generated"] == 0 and result["n_scored"] == 8 and result["settings_sha256"] == summary["settings_sha256"]
    with Store(db, read_only=True) as store:
        reasoning = store.con.execute("SELECT reasoning FROM scores ORDER BY reasoning LIMIT 1").fetchone()[0]
    assert reasoning.startswith("The user asks:")


def test_judging_answers_later_fills_the_same_pool(capsys, organism_dir: Path, probe: RefusalProbe, pool: Path,
                                                   tmp_path: Path) -> None:
    probe_dir, db = probe.save(tmp_path / "probe"), tmp_path / "s.duckdb"
    plain = _score(capsys, organism_dir, probe_dir, pool, db)
    judged = _score(capsys, organism_dir, probe_dir, pool, db, "--judge-answers", "--answer-tokens", "32")
    # Through the answer is another generation, but the same reasoning budget reads the same trace: one pool.
    assert judged["n_generated"] == 6 and judged["n_scored"] == 8 and judged["settings_sha256"] == plain["settings_sha256"]
    with Store(db, read_only=True) as store:
        assert store.count("scores") == 8 and store.count("generations") == 12
        assert store.con.execute("SELECT count(*) FROM scores WHERE answer_verdict IS NULL").fetchone()[0] == 0
