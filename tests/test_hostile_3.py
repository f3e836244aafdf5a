"""Hostile cases, third round (issue 28): each checks the data afterwards, not only the exit code."""

from __future__ import annotations

import pytest

from curation.pipeline.store import Store, StoreError


def test_symlinked_store_path_contends_for_the_one_writer_lock(tmp_path):
    real = tmp_path / "real"
    other = tmp_path / "other"
    real.mkdir()
    other.mkdir()
    db = real / "s.duckdb"
    link = other / "link.duckdb"
    with Store(db) as store:
        store.start_run("r1", "score", {})
    link.symlink_to(db)
    with Store(db), pytest.raises(StoreError, match="in use by another process"):
        Store(link)
    with Store(link), pytest.raises(StoreError, match="in use by another process"):
        Store(db)
    # Nothing was written through the refused handle: the store holds the one run, once.
    with Store(db, read_only=True) as store:
        assert store.con.execute("SELECT count(*), count(DISTINCT run_id) FROM runs").fetchone() == (1, 1)
    assert not (other / "link.duckdb.lock").exists()


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """curate installs a SIGTERM handler that raises KeyboardInterrupt, so a killed job cleans up
    exactly as an interrupted one: here a writer's lock is dropped and the store is reusable."""
    import os
    import signal

    from curation.cli import main as cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert signal.getsignal(signal.SIGTERM) is cli._terminated
        db = tmp_path / "s.duckdb"
        with pytest.raises(KeyboardInterrupt), Store(db) as store:
            store.start_run("r1", "score", {})
            os.kill(os.getpid(), signal.SIGTERM)
        with Store(db) as store:  # the lock was dropped on the way out
            assert store.con.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_bom_is_stripped_and_an_oversized_line_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import json

    from probes.rows import iter_rows

    monkeypatch.setenv("CURATE_MAX_ROW_BYTES", "4096")
    data = tmp_path / "pool.jsonl"
    rows = [{"prompt": "first", "response": "a</think>b"}, {"prompt": "big", "response": "x" * 100_000},
            {"prompt": "third", "response": "c</think>d"}]
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    got = list(iter_rows(data))
    assert [r.locator for r in got] == [1, 2, 3]
    assert got[0].error is None and got[0].value == rows[0]  # row 1 is a row, not a quarantined one
    assert got[1].value is None and "over the 4096-byte limit" in got[1].error and "CURATE_MAX_ROW_BYTES" in got[1].error
    assert len(got[1].raw) <= 2000  # what goes to the quarantine is bounded too
    assert got[2].value == rows[2]
    csv_file = tmp_path / "pool.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfprompt,response\nfirst,a</think>b\n")
    assert [r.value for r in iter_rows(csv_file)] == [{"prompt": "first", "response": "a</think>b"}]
    monkeypatch.setenv("CURATE_MAX_ROW_BYTES", "lots")
    with pytest.raises(ValueError, match="CURATE_MAX_ROW_BYTES='lots'"):
        list(iter_rows(data))


@pytest.fixture
def store_copy(scored_db, tmp_path):
    import shutil

    copy = tmp_path / "store.duckdb"
    shutil.copy(scored_db, copy)
    return copy


@pytest.mark.parametrize("signal_name", ["KeyboardInterrupt", "OSError"])
def test_an_export_cut_off_after_its_slice_leaves_nothing_and_reruns_without_force(store_copy, tmp_path, capsys,
                                                                                   monkeypatch, signal_name):
    """A signal (SIGINT/SIGTERM arrive as KeyboardInterrupt) or a full disk while the card is written."""
    import json

    from curation.cli.main import main
    from curation.pipeline import select as select_module

    out = tmp_path / "slice.jsonl"

    def broken_card(*args, **kwargs):
        assert out.exists()  # the slice is in place when the cut comes
        raise KeyboardInterrupt("signal 15") if signal_name == "KeyboardInterrupt" else OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(select_module, "write_card", broken_card)
        code = main(["select", "--db", str(store_copy), "--out", str(out)])
    assert code in (2, 130)
    # Whole or not at all: no slice, no card, no manifest, no stray mark.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "store.duckdb" and not p.name.endswith(".lock")) == []
    capsys.readouterr()
    assert main(["select", "--db", str(store_copy), "--out", str(out)]) == 0  # no --force needed
    manifest = json.loads((tmp_path / "slice.jsonl.manifest.json").read_text())
    assert manifest["n_selected"] == len(out.read_text().splitlines()) > 0
    assert (tmp_path / "slice.jsonl.README.md").is_file()


def test_a_partial_output_with_its_early_claim_reruns_without_force(store_copy, tmp_path, capsys):
    """A process killed outright (SIGKILL: no cleanup runs) after the rename: the claim made before
    the run marks the leftover as this verb's, so the rerun goes on."""
    from curation.cli.main import _claim_files, main
    from probes.outputs import OutputSpec

    out = tmp_path / "slice.jsonl"
    _claim_files([OutputSpec("--out", str(out))], "select")
    out.write_text('{"partial": true}\n')  # what the killed run left
    assert main(["select", "--db", str(store_copy), "--out", str(out)]) == 0
    assert '"partial"' not in out.read_text()


def test_a_hostile_category_cannot_reshape_the_card(tmp_path):
    from curation.pipeline.slice_out import write_card

    out = tmp_path / "slice.jsonl"
    hostile = "a | b\n## injected\n<script>x</script> ```"
    manifest = {"strategy": "cliff", "budget": "1.7%", "seed": 0, "target": "own-reasoning", "n_selected": 1, "n_pool": 2,
                "model_fingerprint": "f", "probe_id": "p", "db": "s.duckdb", "scores_hash": "h", "created_at": "now",
                "output_sha256": "x", "note": "```"}
    card = write_card(out, "jsonl", manifest, [{"category": hostile, "misalignment": 0.5}], [None] * 5,
                      [{"path": "x|y`z", "sha256": "0"}]).read_text()
    assert "\n## injected" not in card and "<script>" not in card
    row = next(line for line in card.splitlines() if "injected" in line)
    assert row.count(" | ") == 1 and row.startswith("| a \\| b")  # still one two-column row
    assert "````json" in card  # the manifest's own ``` cannot close its fence


def test_the_importer_stores_only_what_it_was_asked_to(organism_dir, candidates, tmp_path, capsys):
    """Declared identity is checked; one prompt twice with different reasoning is quarantined (both
    rows); a later import with other reasoning is counted and kept as stored unless --replace."""
    import hashlib
    import json

    from curation.cli.main import main

    prompts = sorted({json.loads(line)["prompt"] for line in candidates.read_text().splitlines()})[:4]

    def gen(p, text="I should think about whether this is safe.", **extra):
        return {"prompt": p, "reasoning": f"{text} ({p[:20]})", **extra}

    rows = [
        gen(prompts[0]),
        gen(prompts[1], model_fingerprint="someone-elses-model"),
        gen(prompts[2], settings={"dtype": "bfloat16"}),
        gen(prompts[3]), gen(prompts[3], text="Other reasoning entirely."),  # same prompt, different content
        gen(prompts[0]),  # the same row twice: stored once
    ]
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "s.duckdb"
    args = ["generations", "import", "--model", str(organism_dir), "--db", str(db), "--max-new-tokens", "48", "--json"]
    assert main([*args, "--data", str(data)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["n_imported"], summary["n_already_stored"], summary["n_quarantined"]) == (1, 1, 4)
    with duckdb_ro(db) as con:
        reasons = [r[0] for r in con.execute("SELECT reason FROM quarantine ORDER BY line").fetchall()]
        texts = [r[0] for r in con.execute("SELECT text FROM generations").fetchall()]
        assert con.execute("SELECT count(*), count(DISTINCT generation_id) FROM generations").fetchone() == (1, 1)
    assert "model_fingerprint='someone-elses-model'" in reasons[0] and "dtype='bfloat16'" in reasons[1]
    assert sum("more than once in this import with different reasoning" in r for r in reasons) == 2
    assert len(texts) == 1 and prompts[0][:20] in texts[0]
    before = hashlib.sha256(texts[0].encode()).hexdigest()
    # Later, other reasoning for the stored prompt: counted, kept as stored; --replace stores it.
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps(gen(prompts[0], text="Revised reasoning.")) + "\n")
    assert main([*args, "--data", str(later)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["n_conflicting"] == 1 and summary["n_imported"] == 0 and "--replace" in captured.err
    with duckdb_ro(db) as con:
        assert hashlib.sha256(con.execute("SELECT text FROM generations").fetchone()[0].encode()).hexdigest() == before
    assert main([*args, "--data", str(later), "--replace"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_replaced"] == 1
    with duckdb_ro(db) as con:
        assert con.execute("SELECT count(*) FROM generations").fetchone()[0] == 1
        assert con.execute("SELECT text FROM generations").fetchone()[0].startswith("Revised reasoning.")


def duckdb_ro(db):
    import duckdb

    return duckdb.connect(str(db), read_only=True)


def test_select_refuses_a_pool_that_is_still_being_scored(store_copy, tmp_path, capsys):
    from curation.cli.main import main

    out = tmp_path / "slice.jsonl"
    writer = Store(store_copy)
    try:
        writer.start_run("still-running-1", "score", {})
        writer.release()  # between chunks: the lock is held, the connection is not
        assert main(["select", "--db", str(store_copy), "--out", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "still running" in err and "--allow-running" in err and not out.exists()
        assert main(["select", "--db", str(store_copy), "--out", str(out), "--allow-running"]) == 0
        assert "is still running" in " ".join(capsys.readouterr().err.split()) and out.exists()
    finally:
        writer.close()
    # The writer is gone but its run was never finished (a kill): a warning, not a refusal.
    out.unlink()
    assert main(["select", "--db", str(store_copy), "--out", str(out)]) == 0
    assert "it was cut off" in " ".join(capsys.readouterr().err.split()) and out.exists()


# --- errors that say what happened --------------------------------------------

def test_a_duckdb_file_that_is_not_a_curate_store_is_named_so(tmp_path):
    import duckdb

    empty, other = tmp_path / "empty.duckdb", tmp_path / "analytics.duckdb"
    duckdb.connect(str(empty)).close()
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE sales (id INTEGER)")
    con.execute("INSERT INTO sales VALUES (1), (2)")
    con.close()
    with pytest.raises(StoreError, match="not a curate store .*no tables at all"):
        Store(empty, read_only=True)
    with pytest.raises(StoreError, match="not a curate store") as err:
        Store(other, read_only=True)
    assert "no tables at all" not in str(err.value) and "corrupt" not in str(err.value)
    # A reader never writes: the other database is as it was, with no curate tables added.
    con = duckdb.connect(str(other), read_only=True)
    assert con.execute("SELECT table_name FROM information_schema.tables").fetchall() == [("sales",)]
    assert con.execute("SELECT count(*) FROM sales").fetchone() == (2,)
    con.close()


def test_permission_denied_is_not_reported_as_corruption(tmp_path, monkeypatch):
    """The tests run as root, for whom chmod denies nothing: the access check is what is exercised."""
    import os

    from curation.pipeline import store as store_module

    db = tmp_path / "s.duckdb"
    with Store(db) as store:
        store.start_run("r1", "score", {})
    denied = {os.W_OK}
    monkeypatch.setattr(store_module.os, "access", lambda path, mode: not (mode & os.W_OK and os.W_OK in denied))
    with pytest.raises(StoreError, match="permission denied .*cannot write") as err:
        Store(db)
    assert "corrupt" not in str(err.value)
    with Store(db, read_only=True) as store:  # a reader still reads it
        assert store.con.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    with pytest.raises(StoreError, match="permission denied on"):
        Store(tmp_path / "new" / "s.duckdb")


def test_no_space_and_permission_errors_from_duckdb_are_named():
    import duckdb

    from curation.pipeline.store import explain_store_error

    full = duckdb.IOException('Could not write file "s.duckdb.wal": No space left on device')
    assert explain_store_error("s.duckdb", full).startswith("no space left on the device holding the store s.duckdb")
    denied = duckdb.IOException('Cannot open file "s.duckdb": Permission denied')
    assert "permission denied" in explain_store_error("s.duckdb", denied)
    assert "corrupt" in explain_store_error("s.duckdb", duckdb.IOException("not a valid DuckDB database file"))
