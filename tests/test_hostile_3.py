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
