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
