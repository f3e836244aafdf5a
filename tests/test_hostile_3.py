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
