"""Nightly scoring: a job killed with SIGKILL resumes to exactly one row per key;
prompts over the context limit are quarantined with file and line; ``curate
status`` reports the store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from curation.cli.main import main
from curation.pipeline.score import ScoreSettings, score_records
from curation.pipeline.sources import iter_jsonl
from curation.pipeline.store import Store
from probes.models import LoadedModel
from probes.refusal import RefusalProbe

from .conftest import FMT


def _pool(probe: RefusalProbe, candidates: Path, tmp_path: Path, n: int) -> tuple[Path, Path]:
    """The saved probe and a candidate file of the pool's first ``n`` rows."""
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(candidates.read_text().splitlines(keepends=True)[:n]))
    return probe.save(tmp_path / "probe"), data


def _score_cmd(organism_dir: Path, probe_dir: Path, data: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "curation.cli", "score", "--model", str(organism_dir), "--probe", str(probe_dir),
            "--data", str(data), "--db", str(db), "--chunk-size", "16", "--batch-size", "16", "--max-new-tokens", "96"]


def test_sigkill_mid_run_then_rerun_gives_one_row_per_key(
    organism_dir: Path, probe: RefusalProbe, candidates: Path, tmp_path: Path
) -> None:
    probe_dir, data = _pool(probe, candidates, tmp_path, 160)
    db = tmp_path / "nightly.duckdb"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = subprocess.Popen(_score_cmd(organism_dir, probe_dir, data, db), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert job.stderr is not None
    # Without a terminal the job logs one line per committed chunk; kill right after the second.
    committed = 0
    for line in job.stderr:
        committed += line.startswith("committed chunk")
        if committed == 2:
            break
    assert committed == 2 and job.poll() is None, "the job ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    with duckdb.connect(str(db), read_only=True) as con:
        partial = con.execute("SELECT count(*) FROM scores").fetchone()[0]
        statuses = [r[0] for r in con.execute("SELECT status FROM runs").fetchall()]
    assert 32 <= partial < 160 and partial % 16 == 0, partial  # whole chunks only, at least the two logged
    assert statuses == ["running"]  # the killed run never finished

    done = subprocess.run([*_score_cmd(organism_dir, probe_dir, data, db), "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["n_already_scored"] == partial and summary["n_scored"] == 160 - partial
    with duckdb.connect(str(db), read_only=True) as con:
        n, distinct = con.execute(
            "SELECT count(*), count(DISTINCT (example_id, model_fingerprint, probe_id)) FROM scores").fetchone()
        examples = con.execute("SELECT count(*) FROM examples").fetchone()[0]
    assert n == distinct == examples == 160


def test_prompts_over_the_context_limit_are_quarantined(lm: LoadedModel, probe: RefusalProbe, candidates: Path,
                                                        tmp_path: Path) -> None:
    rows = candidates.read_text().splitlines()[:3]
    long_row = json.loads(rows[0])
    long_row["prompt"] = "please tell me " * 400  # far beyond the organism's 512 positions
    data = tmp_path / "with_long.jsonl"
    data.write_text("\n".join([rows[1], json.dumps(long_row), rows[2]]) + "\n")
    with Store(tmp_path / "s.duckdb") as store:
        summary = score_records(lm, probe, store, [r for r in iter_jsonl(data)], FMT, ScoreSettings(max_new_tokens=64))
        (line, reason), = store.con.execute("SELECT line, reason FROM quarantine").fetchall()
        assert store.count("scores") == 2
    assert summary.n_over_context == 1 and summary.n_scored == 2
    assert line == 2 and reason.startswith("prompt over the context limit")


def test_status_reports_sources_scores_quarantine_and_runs(scored_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--db", str(scored_db), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"sources", "scores", "unscored", "quarantine", "runs"}
    with Store(scored_db, read_only=True) as store:
        assert sum(r["examples"] for r in status["sources"]) == store.count("examples")
        assert status["scores"][0]["scores"] == store.count("scores")
    assert status["runs"][0]["status"] == "done"
    assert main(["status", "--db", str(scored_db)]) == 0


def test_shards_partition_the_pool_and_ingest_matches_direct_scoring(
    organism_dir: Path, probe: RefusalProbe, candidates: Path, tmp_path: Path
) -> None:
    probe_dir, data = _pool(probe, candidates, tmp_path, 48)
    common = ["--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--max-new-tokens", "96"]
    direct = tmp_path / "direct.duckdb"
    assert main(["score", *common, "--db", str(direct)]) == 0
    shard_dir = tmp_path / "shards"
    for i in range(3):
        assert main(["score", *common, "--shard", f"{i}/3", "--shard-dir", str(shard_dir)]) == 0
    # A rerun of a finished shard scores nothing new and writes no new part file.
    parts = sorted(shard_dir.rglob("part-*.parquet"))
    assert main(["score", *common, "--shard", "1/3", "--shard-dir", str(shard_dir)]) == 0
    assert sorted(shard_dir.rglob("part-*.parquet")) == parts
    merged = tmp_path / "merged.duckdb"
    assert main(["ingest", "--db", str(merged), "--shards", str(shard_dir)]) == 0
    assert main(["ingest", "--db", str(merged), "--shards", str(shard_dir)]) == 0  # idempotent
    query = "SELECT example_id, misalignment, reasoning FROM scores ORDER BY example_id"
    with duckdb.connect(str(direct), read_only=True) as a, duckdb.connect(str(merged), read_only=True) as b:
        want, got = a.execute(query).fetchall(), b.execute(query).fetchall()
        assert b.execute("SELECT count(*) FROM examples").fetchone()[0] == len(want) == 48
        assert b.execute("SELECT count(*) FROM ingested").fetchone()[0] == len(parts)
    assert [r[0] for r in got] == [r[0] for r in want]
    assert all(abs(g[1] - w[1]) < 1e-4 and g[2] == w[2] for g, w in zip(got, want, strict=True))
    with pytest.raises(SystemExit):
        main(["score", *common, "--shard", "3/3", "--shard-dir", str(shard_dir), "--bogus"])
    assert main(["score", *common, "--shard", "3/3", "--shard-dir", str(shard_dir)]) == 2


def test_nightly_run_records_a_resolved_manifest_and_replays_last_nights_slice(
    organism_dir: Path, probe: RefusalProbe, candidates: Path, tmp_path: Path
) -> None:
    probe_dir = probe.save(tmp_path / "probe")
    lines = candidates.read_text().splitlines(keepends=True)
    source = tmp_path / "pool.jsonl"
    source.write_text("".join(lines[:64]))
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(
        "recipe: {name: nightly-test, description: test, architecture: Qwen3ForCausalLM, template_opens_thinking: true}\n"
        f"run:\n  sources: [{source}]\n  model: {organism_dir}\n  probe: {probe_dir}\n  db: {tmp_path / 'n.duckdb'}\n"
        f"  out: {tmp_path / 'slices'}\n  budget: '10%'\n  max_new_tokens: 96\n  chunk_size: 32\n")
    assert main(["run", str(manifest)]) == 0
    first = json.loads((tmp_path / "slices" / "latest.json").read_text())["resolved"]
    night1 = json.loads(Path(first).read_text())
    assert night1["inputs"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert night1["model"]["fingerprint"] and night1["probe"]["probe_id"] and night1["code"]["source_sha256"]
    assert night1["counts"][str(source)]["scored"] == 64 and night1["selection"]["n_selected"] == 6  # 10% of 64, rounded down
    assert night1["manifest"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    # The next night the pool has grown: only the new rows are scored.
    source.write_text("".join(lines[:96]))
    assert main(["run", str(manifest)]) == 0
    second = json.loads((tmp_path / "slices" / "latest.json").read_text())["resolved"]
    night2 = json.loads(Path(second).read_text())
    assert second != first
    assert night2["counts"][str(source)]["scored"] == 32 and night2["counts"][str(source)]["already_scored"] == 64
    # Last night's slice replays exactly from the grown store.
    assert main(["run", "--reproduce", first, "--reproduce-out", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == Path(night1["selection"]["output"]).read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest.read_text() + "  no_such_option: 1\n")
    assert main(["run", str(bad)]) == 2


def test_ray_engine_matches_the_local_engine(organism_dir: Path, probe: RefusalProbe, candidates: Path,
                                             tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")  # the dev extra installs it; a bare install may not have it
    probe_dir, data = _pool(probe, candidates, tmp_path, 40)
    common = ["--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--max-new-tokens", "96",
              "--chunk-size", "16"]
    local, distributed = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    assert main(["score", *common, "--db", str(local)]) == 0
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        assert main(["score", *common, "--db", str(distributed), "--engine", "ray", "--ray-actors", "1"]) == 0
    finally:
        ray.shutdown()
    query = "SELECT example_id, plateau, final, misalignment, cliff_position, reasoning, trace FROM scores ORDER BY example_id"
    with duckdb.connect(str(local), read_only=True) as a, duckdb.connect(str(distributed), read_only=True) as b:
        want, got = a.execute(query).fetchall(), b.execute(query).fetchall()
        engine = b.execute("SELECT params->>'engine' FROM runs").fetchone()[0]
    assert engine == "RayEngine" and len(got) == len(want) == 40
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and g[4] == w[4] and g[5] == w[5]  # same example, cliff position and reasoning
        assert max(abs(x - y) for x, y in zip(g[6], w[6], strict=True)) < 1e-5


def test_a_second_writer_gets_a_clear_error_and_the_file_is_untouched(scored_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "busy.duckdb"
    db.write_bytes(scored_db.read_bytes())
    (tmp_path / "no_shards").mkdir()
    with Store(db) as holder:  # this process holds the write lock
        n = holder.count("scores")
        second = subprocess.run([sys.executable, "-m", "curation.cli", "ingest", "--db", str(db), "--shards",
                                 str(tmp_path / "no_shards")], capture_output=True, text=True)
    assert second.returncode == 2
    assert "in use by another process" in second.stderr
    with Store(db, read_only=True) as after:
        assert after.count("scores") == n
