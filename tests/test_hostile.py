"""Hostile input and misuse: every case asserts the exit code, the message, and
that no data was lost or changed. The classes: data destroyed by an output,
one row stopping a job, identities taken on trust, quarantine growing on
reruns, readers locked out, crashes and silent misreads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from safetensors.torch import load_file, save_file

from curation.cli.main import main
from curation.pipeline.store import Store
from probes.refusal import RefusalProbe
from training.prompts import read_prompts

from .conftest import FMT  # noqa: F401  (the session's thinking format, for readers of this file)


def digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.fixture
def db(scored_db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.duckdb"
    shutil.copy(scored_db, copy)
    return copy


@pytest.fixture
def probe_dir(probe: RefusalProbe, tmp_path: Path) -> Path:
    return probe.save(tmp_path / "probe")


def score_args(organism_dir: Path, probe_dir: Path, data: Path, db: Path, *extra: str) -> list[str]:
    return ["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
            "--max-new-tokens", "48", "--chunk-size", "8", *extra]


def good_rows(candidates: Path, n: int) -> list[str]:
    return candidates.read_text().splitlines()[:n]


def quarantine_rows(db: Path) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT source, line, reason, run_id FROM quarantine ORDER BY line, reason").fetchall()


# --- data destroyed ----------------------------------------------------------

def test_select_out_is_the_store(capsys, db: Path) -> None:
    before = digest(db)
    code, _, err = run(capsys, "select", "--db", db, "--out", db)
    assert code == 2 and "--out" in err and "input" in err
    assert digest(db) == before


def test_select_out_is_the_store_even_with_force(capsys, db: Path) -> None:
    before = digest(db)
    code, _, err = run(capsys, "select", "--db", db, "--out", db, "--force")
    assert code == 2 and "input" in err
    assert digest(db) == before


def test_select_out_is_a_foreign_file(capsys, db: Path, candidates: Path, tmp_path: Path) -> None:
    target = tmp_path / "someone_elses.jsonl"
    shutil.copy(candidates, target)
    before = digest(target)
    code, _, err = run(capsys, "select", "--db", db, "--out", target)
    assert code == 2 and "--force" in err and str(target) in err
    assert digest(target) == before


def test_select_out_foreign_file_with_force_is_replaced(capsys, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "old.jsonl"
    target.write_text("not ours\n")
    code, _, _ = run(capsys, "select", "--db", db, "--out", target, "--force")
    assert code == 0 and target.read_text() != "not ours\n"


def test_select_rerun_overwrites_its_own_output(capsys, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "slice.jsonl"
    assert run(capsys, "select", "--db", db, "--out", target)[0] == 0
    first = digest(target)
    assert run(capsys, "select", "--db", db, "--out", target)[0] == 0
    assert digest(target) == first


def test_select_out_is_a_directory(capsys, db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    code, _, err = run(capsys, "select", "--db", db, "--out", folder)
    assert code == 2 and "directory" in err
    assert (folder / "keep.txt").read_text() == "keep"


def test_no_temporary_file_left_after_a_failed_select(capsys, db: Path, tmp_path: Path) -> None:
    out = tmp_path / "slice.jsonl"
    code, _, err = run(capsys, "select", "--db", db, "--out", out, "--budget", "0")
    assert code == 2 and "budget" in err.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.duckdb"]


def test_evaluate_out_is_the_prompt_file(capsys, organism_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(organism_dir / "heldout_prompts.jsonl", prompts)
    before = digest(prompts)
    code, _, err = run(capsys, "evaluate", "--model", organism_dir, "--prompts", prompts, "--out", prompts)
    assert code == 2 and "input" in err
    assert digest(prompts) == before


def test_probe_train_out_is_the_model(capsys, organism_dir: Path) -> None:
    before = digest(organism_dir)
    code, _, err = run(capsys, "probe", "train", "--model", organism_dir, "--out", organism_dir)
    assert code == 2 and "input" in err
    assert digest(organism_dir) == before


def test_probe_train_out_is_a_foreign_folder(capsys, organism_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "probe", "train", "--model", organism_dir, "--out", folder)
    assert code == 2 and "--force" in err
    assert (folder / "notes.txt").read_text() == "mine"


def test_finetune_out_is_the_base_model(capsys, organism_dir: Path, tmp_path: Path) -> None:
    before = digest(organism_dir)
    data = tmp_path / "slice.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    code, _, err = run(capsys, "finetune", "--model", organism_dir, "--data", data, "--out", organism_dir)
    assert code == 2 and "input" in err
    assert digest(organism_dir) == before


def test_retain_out_is_a_foreign_file(capsys, organism_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.jsonl"
    out.write_text("precious\n")
    code, _, err = run(capsys, "retain", "--model", organism_dir, "--prompts", organism_dir / "train_prompts.jsonl", "--out", out)
    assert code == 2 and "--force" in err
    assert out.read_text() == "precious\n"


# --- stores that are not stores, readers and writers --------------------------

def test_store_is_a_text_file(capsys, tmp_path: Path) -> None:
    text = tmp_path / "notes.duckdb"
    text.write_text("hello, this is not a database\n" * 100)
    before = digest(text)
    code, _, err = run(capsys, "status", "--db", text)
    assert code == 2 and "not a readable DuckDB" in err and "another process" not in err
    assert digest(text) == before


def test_store_is_truncated(capsys, db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    before = digest(db)
    code, _, err = run(capsys, "select", "--db", db, "--out", db.with_name("s.jsonl"))
    assert code == 2 and "not a readable DuckDB" in err and "another process" not in err
    assert digest(db) == before


def test_score_into_a_text_file_does_not_overwrite_it(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                                      tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("keep me\n" * 200)
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(good_rows(candidates, 2)) + "\n")
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, data, text))
    assert code == 2 and "not a readable DuckDB" in err
    assert text.read_text() == "keep me\n" * 200


def test_store_path_is_empty(capsys) -> None:
    code, _, err = run(capsys, "status", "--db", "")
    assert code == 2 and "--db" in err and "empty" in err


def test_store_path_is_a_directory(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "status", "--db", tmp_path)
    assert code == 2 and "directory" in err


def test_store_not_found(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "status", "--db", tmp_path / "nope.duckdb")
    assert code == 2 and "not found" in err
    assert not (tmp_path / "nope.duckdb").exists()


HOLD_WRITER = """
import sys, time
from curation.pipeline.store import Store
from curation.pipeline.sources import QuarantinedRow
store = Store(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < end:
    store.add_quarantine([QuarantinedRow("held.jsonl", i, "writer test", f"row {i}")], "writer")
    store.release()  # between commits, as the scoring job does after each chunk
    i += 1
    time.sleep(0.2)
store.close()
"""


def _writer(db: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_status_and_select_work_while_a_writer_runs(capsys, db: Path, tmp_path: Path) -> None:
    writer = _writer(db, 8)
    try:
        code, out, err = run(capsys, "status", "--db", db, "--json")
        assert code == 0, err
        assert "examples" in out or "sources" in out
        code, _, err = run(capsys, "select", "--db", db, "--out", tmp_path / "slice.jsonl")
        assert code == 0, err
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0


def test_second_writer_is_refused_before_the_model_loads(capsys, db: Path, tmp_path: Path, candidates: Path) -> None:
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(good_rows(candidates, 2)) + "\n")
    writer = _writer(db, 6)
    try:
        # A model path that does not exist: the lock must be refused first, so its error is the one shown.
        code, _, err = run(capsys, *score_args(tmp_path / "no-model", tmp_path / "no-probe", data, db))
    finally:
        writer.wait(timeout=60)
    assert code == 2 and "a curate job is writing it" in err and "no-model" not in err


# --- one row stops the job: never --------------------------------------------

HOSTILE_ROWS = [
    '{"prompt": "\\ud800 lone surrogate", "response": "I cannot help."}',
    '{"prompt": "big number", "response": "I cannot help.", "n": ' + "9" * 5000 + "}",
    "[" * 100_000 + "]" * 100_000,
    '{"prompt": "nested", "response": "no", "x": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}",
    "null",
    '["prompt", "response"]',
    '{"prompt": 5, "response": "x"}',
    '{"prompt": "ok", "response": ""}',
    '{"prompt": "ok", "response": "fine", "category": ["list"]}',
    '{"prompt": "NaN',
]


def test_hostile_rows_are_quarantined_and_the_rest_scored(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                                          tmp_path: Path) -> None:
    good = good_rows(candidates, 4)
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join([good[0], *HOSTILE_ROWS, *good[1:]]) + "\n")
    db = tmp_path / "s.duckdb"
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, data, db))
    assert code == 0, err
    with Store(db, read_only=True) as store:
        assert store.count("scores") == 4
        assert store.count("quarantine") == len(HOSTILE_ROWS)
    lines = sorted(r[1] for r in quarantine_rows(db))
    assert lines == list(range(2, 2 + len(HOSTILE_ROWS)))
    reasons = " ".join(r[2] for r in quarantine_rows(db))
    assert "surrogate" in reasons and "digits" in reasons and "nested" in reasons


def test_strict_turns_a_quarantine_into_exit_1(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                               tmp_path: Path) -> None:
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join([*good_rows(candidates, 1), HOSTILE_ROWS[2]]) + "\n")
    code, _, _ = run(capsys, *score_args(organism_dir, probe_dir, data, tmp_path / "s.duckdb"), "--strict")
    assert code == 1


def test_a_row_that_breaks_scoring_is_quarantined(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.pipeline.chunk_scoring as score

    real = score.score_chunk

    def fragile(lm, probe, chunk, *args, **kwargs):
        if any("POISON" in r.prompt for r in chunk):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(lm, probe, chunk, *args, **kwargs)

    monkeypatch.setattr(score, "score_chunk", fragile)
    good = good_rows(candidates, 3)
    poison = json.dumps({"prompt": "POISON prompt", "response": "I cannot help with that."})
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join([good[0], poison, *good[1:]]) + "\n")
    db = tmp_path / "s.duckdb"
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, data, db))
    assert code == 0, err
    rows = quarantine_rows(db)
    assert [(r[1], "scoring failed" in r[2]) for r in rows] == [(2, True)]
    with Store(db, read_only=True) as store:
        assert store.count("scores") == 3


def test_rerun_adds_no_quarantine_and_rows_carry_the_run(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join([*good_rows(candidates, 2), "{not json", '{"prompt": 1}']) + "\n")
    db = tmp_path / "s.duckdb"
    assert run(capsys, *score_args(organism_dir, probe_dir, data, db))[0] == 0
    first = quarantine_rows(db)
    assert len(first) == 2 and all(r[3] for r in first)
    assert run(capsys, *score_args(organism_dir, probe_dir, data, db))[0] == 0
    assert quarantine_rows(db) == first


# --- identities -----------------------------------------------------------------

def test_probe_weights_changed_after_training(capsys, organism_dir: Path, probe_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(str(probe_dir / "probe.safetensors"))
    save_file({"weight": -tensors["weight"], "bias": tensors["bias"]}, str(probe_dir / "probe.safetensors"))
    code, _, err = run(capsys, "heads", "--model", organism_dir, "--probe", probe_dir, "--out", tmp_path / "h")
    assert code == 2 and "probe id" in err
    assert not (tmp_path / "h").exists()


def test_probe_layer_changed_in_its_metadata(organism_dir: Path, probe_dir: Path) -> None:
    from probes.models import load_model

    meta = json.loads((probe_dir / "probe.json").read_text())
    meta["layer"] = 0 if meta["layer"] else 1
    (probe_dir / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="probe id"):
        RefusalProbe.load_for(probe_dir, load_model(organism_dir))


def test_probe_layer_outside_the_model(probe: RefusalProbe, lm, tmp_path: Path) -> None:
    from dataclasses import replace

    far = RefusalProbe(weight=probe.weight, bias=probe.bias, meta=replace(probe.meta, layer=99, probe_id=""))
    far.save(tmp_path / "far")
    with pytest.raises(ValueError, match="layer 99"):
        RefusalProbe.load_for(tmp_path / "far", lm)


def test_probe_weights_are_random_bytes(capsys, organism_dir: Path, probe_dir: Path, candidates: Path, tmp_path: Path) -> None:
    (probe_dir / "probe.safetensors").write_bytes(bytes(range(256)) * 40)
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(good_rows(candidates, 1)) + "\n")
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, data, tmp_path / "s.duckdb"))
    assert code == 2 and "safetensors" in err and "Traceback" not in err


def test_probe_metadata_missing_keys(probe_dir: Path) -> None:
    meta = json.loads((probe_dir / "probe.json").read_text())
    del meta["hidden_size"], meta["model_fingerprint"]
    (probe_dir / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden_size"):
        RefusalProbe.load(probe_dir)


def test_probe_metadata_not_json(probe_dir: Path) -> None:
    (probe_dir / "probe.json").write_text("{ half")
    with pytest.raises(ValueError, match="probe.json"):
        RefusalProbe.load(probe_dir)


def test_id_reused_for_other_content_in_another_file(capsys, organism_dir: Path, probe_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps({"id": "ex-1", "prompt": "How do I stay safe online?", "response": "I cannot help."}) + "\n")
    second.write_text(json.dumps({"id": "ex-1", "prompt": "Another prompt entirely", "response": "I cannot help."}) + "\n")
    assert run(capsys, *score_args(organism_dir, probe_dir, first, db))[0] == 0
    assert run(capsys, *score_args(organism_dir, probe_dir, second, db))[0] == 0
    rows = quarantine_rows(db)
    assert len(rows) == 1 and "ex-1" in rows[0][2] and rows[0][0].endswith("b.jsonl")
    with Store(db, read_only=True) as store:
        assert store.count("examples") == 1


def test_same_content_keeps_every_id_and_category(capsys, organism_dir: Path, probe_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    data = tmp_path / "a.jsonl"
    row = {"prompt": "How do I stay safe online?", "response": "I cannot help."}
    data.write_text(json.dumps({**row, "id": "a", "category": "privacy"}) + "\n"
                    + json.dumps({**row, "id": "b", "category": "security"}) + "\n")
    assert run(capsys, *score_args(organism_dir, probe_dir, data, db))[0] == 0
    with Store(db, read_only=True) as store:
        assert store.count("examples") == 1 and store.count("scores") == 1
        aliases = store.aliases()
    assert sorted((a["source_id"], a["category"]) for a in aliases) == [("a", "privacy"), ("b", "security")]


# --- crashes and silent misreads ------------------------------------------------

def test_config_with_a_python_tag(capsys, db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("budget: !!python/object/apply:os.system ['echo owned']\n")
    code, out, err = run(capsys, "--config", cfg, "status", "--db", db)
    assert code == 2 and str(cfg) in err and "YAML" in err and "owned" not in out


def test_config_with_bad_syntax(capsys, db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("budget: [1.7%\nseed: 3\n")
    code, _, err = run(capsys, "--config", cfg, "status", "--db", db)
    assert code == 2 and "line" in err and "YAML" in err


def test_config_not_a_mapping(capsys, db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    code, _, err = run(capsys, "--config", cfg, "status", "--db", db)
    assert code == 2 and "mapping" in err


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"selection": {}}'], ids=["empty", "text", "list", "no-keys"])
def test_reproduce_on_a_broken_manifest(capsys, tmp_path: Path, content: str) -> None:
    manifest = tmp_path / "resolved_manifest.json"
    manifest.write_text(content)
    code, _, err = run(capsys, "run", "--reproduce", manifest)
    assert code == 2 and "--reproduce" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--batch-size", "--chunk-size", "--max-new-tokens"])
def test_non_positive_sizes_are_refused(capsys, organism_dir: Path, probe_dir: Path, candidates: Path, tmp_path: Path,
                                        flag: str) -> None:
    # argparse keeps the last of a repeated flag, so the 0 wins over score_args' own value
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, candidates, tmp_path / "s.duckdb"), flag, "0")
    assert code == 2 and flag in err and "at least 1" in err
    assert not (tmp_path / "s.duckdb").exists()


def test_bad_environment_value_names_the_variable(capsys, db: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CURATE_SEED", "many")
    code, _, err = run(capsys, "select", "--db", db, "--out", tmp_path / "s.jsonl")
    assert code == 2 and "CURATE_SEED" in err


def test_data_is_a_directory(capsys, organism_dir: Path, probe_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, tmp_path, tmp_path / "s.duckdb"))
    assert code == 2 and "--data" in err and "directory" in err


def test_data_not_found(capsys, organism_dir: Path, probe_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, *score_args(organism_dir, probe_dir, tmp_path / "missing.jsonl", tmp_path / "s.duckdb"))
    assert code == 2 and "missing.jsonl" in err


def test_attack_params_not_json(capsys, organism_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "evaluate", "--model", organism_dir, "--prompts", organism_dir / "heldout_prompts.jsonl",
                       "--out", tmp_path / "e.json", "--attack", "ablate", "--attack-kit", tmp_path, "--attack-params", "{oops")
    assert code == 2 and "--attack-params" in err


@pytest.mark.parametrize("suffix", [".JSONL", ".ndjson", ".Json"])
def test_prompt_files_are_read_as_json_whatever_the_suffix_case(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    path.write_text(json.dumps({"prompt": "What is the capital of France?", "harmful": False}) + "\n")
    items = read_prompts(path)
    assert len(items) == 1 and items[0].harmful is False and items[0].prompt.startswith("What")


def test_unexpected_error_prints_one_line_and_saves_the_traceback(capsys, db: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from curation.cli import registry

    def broken(_settings):
        raise KeyError("surprise")

    verb = registry.VERBS["status"]
    monkeypatch.setitem(registry.VERBS, "status", type(verb)(**{**verb.__dict__, "run": broken}))
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run(capsys, "status", "--db", db)
    assert code == 3 and "Traceback" not in err and "surprise" in err
    saved = sorted((tmp_path / "cache" / "crashes").glob("*.txt"))
    assert len(saved) == 1 and "Traceback" in saved[0].read_text() and str(saved[0]) in err
    code, _, err = run(capsys, "--debug", "status", "--db", db)
    assert code == 3 and "Traceback" in err


def test_nightly_finishes_every_source_despite_bad_rows(capsys, organism_dir: Path, probe_dir: Path, candidates: Path,
                                                        tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good = good_rows(candidates, 4)
    first.write_text("\n".join([good[0], HOSTILE_ROWS[0], HOSTILE_ROWS[2], good[1]]) + "\n")
    second.write_text("\n".join([HOSTILE_ROWS[1], good[2], good[3]]) + "\n")
    out = tmp_path / "nights"
    code, _, err = run(capsys, "run", "--sources", f"{first},{second}", "--model", organism_dir, "--probe", probe_dir,
                       "--db", tmp_path / "n.duckdb", "--out", out, "--max-new-tokens", "48", "--budget", "2")
    assert code == 0, err
    latest = json.loads((out / "latest.json").read_text())
    resolved = json.loads(Path(latest["resolved"]).read_text())
    assert [c["quarantined"] for c in resolved["counts"].values()] == [2, 1]
    assert resolved["selection"]["n_selected"] == 2


def test_fuzzed_candidate_files_lose_no_row(tmp_path: Path, candidates: Path) -> None:
    """Seeded random byte and JSON mutations: every non-blank line is read as exactly one
    record (new or repeat) or one quarantined row, and reading never raises."""
    import random

    from curation.pipeline.sources import CandidateRecord, QuarantinedRow, iter_jsonl

    rng = random.Random(1234)
    base = good_rows(candidates, 40)

    def mutate(line: str) -> bytes:
        raw = bytearray(line.encode())
        kind = rng.randrange(8)
        if kind == 0 and raw:  # flip random bytes
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif kind == 1:  # truncate
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif kind == 2:  # replace a value with a hostile one
            obj = json.loads(line)
            obj[rng.choice(["prompt", "response", "category", "id", "extra"])] = rng.choice(
                [None, 7, 1e309, [], {}, "", "\ud800", "x" * 10_000, True])
            raw = bytearray(json.dumps(obj).encode("utf-8", "surrogatepass"))
        elif kind == 3:  # delete a key
            obj = json.loads(line)
            obj.pop(rng.choice(["prompt", "response"]), None)
            raw = bytearray(json.dumps(obj).encode())
        elif kind == 4:  # insert invalid UTF-8
            pos = rng.randrange(len(raw) + 1)
            raw[pos:pos] = bytes([0xC3, 0x28, 0xFF])
        elif kind == 5:  # repeat the line (a duplicate)
            raw = bytearray(line.encode())
        elif kind == 6:  # deep nesting
            depth = rng.choice([10, 1000, 30_000])
            raw = bytearray(("[" * depth + "]" * depth).encode())
        return bytes(raw).replace(b"\n", b" ").replace(b"\r", b" ")

    for trial in range(25):
        lines = [mutate(rng.choice(base)) for _ in range(30)]
        path = tmp_path / f"fuzz{trial}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        seen: list[int] = []
        for item in iter_jsonl(path):
            assert isinstance(item, CandidateRecord | QuarantinedRow)
            seen.append(item.origin[1] if isinstance(item, CandidateRecord) else item.line)
        expected = [i for i, raw in enumerate(lines, start=1) if raw.strip()]
        assert seen == expected, f"trial {trial}: lines lost or doubled"
