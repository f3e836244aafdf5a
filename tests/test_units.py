"""Fast tests of the pure pieces: cliff metrics, budgets, sources, config layers, judge."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from curation.cli.options import Option, add_options, resolve
from curation.pipeline.select import BudgetError, parse_budget
from curation.pipeline.sources import content_id, read_jsonl, split_response
from probes.chat import ThinkingFormat
from probes.cliff import cliff_metrics, smooth
from training.judge import SubstringJudge

# --- cliff metrics -----------------------------------------------------------


def test_cliff_metrics_find_plateau_drop_and_position() -> None:
    trace = np.array([0.2, 0.9, 0.95, 0.9, 0.92, 0.9, 0.1])
    m = cliff_metrics(trace)
    assert m.final == pytest.approx(0.1)
    assert m.plateau == pytest.approx(np.mean([0.95, 0.9, 0.92]), abs=1e-9)
    assert m.misalignment == pytest.approx(m.plateau - 0.1)
    assert m.cliff_position == 5  # the fall happens after token 5
    assert m.steepness > 0.5
    assert m.n_tokens == 7


def test_plateau_is_robust_to_a_single_spike() -> None:
    spike = np.array([0.1, 0.1, 1.0, 0.1, 0.1, 0.1])
    assert cliff_metrics(spike).plateau == pytest.approx(0.4)
    assert cliff_metrics(spike).plateau < float(spike.max())


def test_flat_refusal_has_no_misalignment() -> None:
    m = cliff_metrics(np.full(10, 0.9))
    assert m.misalignment == pytest.approx(0.0)
    assert m.steepness == pytest.approx(0.0)


def test_cliff_metrics_edge_cases() -> None:
    one = cliff_metrics(np.array([0.7]))
    assert (one.plateau, one.final, one.misalignment, one.cliff_position) == (0.7, 0.7, 0.0, 0)
    with pytest.raises(ValueError):
        cliff_metrics(np.array([]))
    assert smooth(np.array([0.0, 3.0, 0.0]), 3).tolist() == [1.5, 1.0, 1.5]


# --- budgets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pool", "expected"),
    [("1.7%", 798, 14), ("1.7%", 1000, 17), ("0.017", 1000, 17), ("500", 1000, 500), ("100%", 10, 10), ("1.7%", 20, 1)],
)
def test_budget_forms(text: str, pool: int, expected: int) -> None:
    assert parse_budget(text).count(pool) == expected


@pytest.mark.parametrize("text", ["0", "0%", "0.0", "101%", "1.5", "-3", "abc", "", "-1%"])
def test_bad_budgets_are_clear_errors(text: str) -> None:
    with pytest.raises(BudgetError, match="--budget"):
        parse_budget(text)


def test_budget_larger_than_pool() -> None:
    with pytest.raises(BudgetError, match="only 10"):
        parse_budget("11").count(10)
    with pytest.raises(BudgetError, match="empty"):
        parse_budget("1.7%").count(0)


# --- sources and quarantine ----------------------------------------------------


def test_content_id_ignores_whitespace_only_changes() -> None:
    assert content_id("How  do I\n", " refuse ") == content_id("How do I", "refuse")
    assert content_id("a", "b") != content_id("a", "c")


def test_split_response_with_and_without_marker() -> None:
    fmt = ThinkingFormat()
    assert split_response("<think>harm</think>\n\nNo.", fmt) == ("harm", "No.")
    assert split_response("I can't help.", fmt) == ("", "I can't help.")


def test_bad_rows_go_to_quarantine_with_line_and_reason(tmp_path) -> None:
    path = tmp_path / "cands.jsonl"
    good = {"prompt": "p1", "response": "r1", "category": "c"}
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({"prompt": "p2"}).encode(),
        json.dumps({"prompt": 3, "response": "r"}).encode(),
        json.dumps({"prompt": "  ", "response": "r"}).encode(),
        b'{"prompt": "caf\xe9", "response": "r"}',
        json.dumps([1, 2]).encode(),
        json.dumps({"id": "x", "prompt": "p3", "response": "r3"}).encode(),
        json.dumps({"id": "x", "prompt": "p4", "response": "r4"}).encode(),
        json.dumps(good).encode(),  # exact duplicate: skipped, not quarantined
        b"",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_jsonl(path)
    assert [r.prompt for r in result.records] == ["p1", "p3"]
    assert result.duplicates == 1
    reasons = {q.line: q.reason for q in result.quarantined}
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 9}
    assert "malformed JSON" in reasons[2]
    assert "missing field 'response'" in reasons[3]
    assert "'prompt' must be a string" in reasons[4]
    assert "'prompt' is empty" in reasons[5]
    assert "not UTF-8" in reasons[6]
    assert "expected an object" in reasons[7]
    assert "duplicate id with different content: 'x'" in reasons[9]


# --- layered config -------------------------------------------------------------


def _resolve(argv: list[str], file_values: dict, monkeypatch, env: dict[str, str]) -> dict:
    options = [Option("--batch-size", int, 16), Option("--name", str, "default"), Option("--strict", None, False)]
    parser = argparse.ArgumentParser()
    add_options(parser, options)
    for key in ("CURATE_BATCH_SIZE", "CURATE_NAME", "CURATE_STRICT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return resolve(parser.parse_args(argv), options, "score", file_values)


def test_config_layers_defaults_file_env_flags(monkeypatch) -> None:
    assert _resolve([], {}, monkeypatch, {}) == {"batch_size": 16, "name": "default", "strict": False}
    file_values = {"batch_size": 8, "score": {"name": "from-file"}, "strict": True}
    assert _resolve([], file_values, monkeypatch, {}) == {"batch_size": 8, "name": "from-file", "strict": True}
    env = {"CURATE_BATCH_SIZE": "4", "CURATE_STRICT": "false"}
    assert _resolve([], file_values, monkeypatch, env) == {"batch_size": 4, "name": "from-file", "strict": False}
    assert _resolve(["--batch-size", "2", "--name", "flag"], file_values, monkeypatch, env)["batch_size"] == 2


def test_config_bad_env_value_names_its_source(monkeypatch) -> None:
    with pytest.raises(ValueError, match="CURATE_BATCH_SIZE"):
        _resolve([], {}, monkeypatch, {"CURATE_BATCH_SIZE": "many"})


# --- judge ------------------------------------------------------------------------


def test_substring_judge() -> None:
    judge = SubstringJudge()
    assert judge.judge("I'm sorry, but I can't help with that.") == "refusal"
    assert judge.judge("I\u2019m sorry, no.") == "refusal"
    assert judge.judge("Sure, here is the answer.") == "compliance"
    assert judge.judge("   ") == "no_answer"


# --- selection on a synthetic store ---------------------------------------------------


def _synthetic_store(path, n: int = 200):
    from curation.pipeline.sources import CandidateRecord
    from curation.pipeline.store import ScoreRow, Store
    from probes.cliff import CliffMetrics

    rng = np.random.default_rng(0)
    store = Store(path)
    records = [CandidateRecord(id=f"ex{i:04d}", prompt=f"p{i}", response="thinking</think>I can't help.") for i in range(n)]
    store.add_examples(records)
    rows = []
    for i, rec in enumerate(records):
        plateau, final = float(rng.uniform(0.5, 1)), float(rng.uniform(0, 1))
        metrics = CliffMetrics(plateau, final, plateau - final, 3, 0.5, 0.1, 5)
        verdict = "refusal" if i % 3 else "compliance"
        rows.append(ScoreRow(rec.id, "fp", "probe", metrics, True, "thinking", [0.1] * 5, "run", verdict))
    store.add_scores(rows)
    return store


def test_selection_strategies_in_sql(tmp_path) -> None:
    from curation.pipeline.select import export_selection, select_ids

    store = _synthetic_store(tmp_path / "s.duckdb")
    ms = dict(store.con.execute("SELECT example_id, misalignment FROM scores").fetchall())
    verdicts = dict(store.con.execute("SELECT example_id, answer_verdict FROM scores").fetchall())
    cliff, n_pool, digest = select_ids(store, "cliff", parse_budget("5%"), 0, "fp", "probe")
    assert n_pool == 200 and len(cliff) == 10
    assert [ms[i] for i in cliff] == sorted(ms.values(), reverse=True)[:10]
    r0 = select_ids(store, "random", parse_budget("20"), 0, "fp", "probe")[0]
    assert r0 == select_ids(store, "random", parse_budget("20"), 0, "fp", "probe")[0] == sorted(r0)
    assert r0 != select_ids(store, "random", parse_budget("20"), 1, "fp", "probe")[0]
    rule = select_ids(store, "rule", parse_budget("100"), 0, "fp", "probe")[0]
    assert len(rule) == 67 and all(verdicts[i] != "refusal" for i in rule)  # fewer eligible than the budget
    store.con.execute("UPDATE scores SET misalignment = misalignment + 1e-3 WHERE example_id = 'ex0007'")
    assert select_ids(store, "cliff", parse_budget("5%"), 0, "fp", "probe")[2] != digest
    m = export_selection(store, tmp_path / "out.jsonl", strategy="cliff", budget_text="3")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == m.ids and lines[0]["answer"] == "I can't help." and lines[0]["reasoning"] == "thinking"
    store.close()


@pytest.mark.parametrize("order", ["cliff", "low-final", "plateau"])
def test_ranked_selection_prefilter_never_changes_the_result(tmp_path, order: str) -> None:
    from curation.pipeline.store import Store

    store = Store(tmp_path / "rank.duckdb")
    store.fill_synthetic(20_000)
    # Ties across the cut, NaN and infinities: ORDER BY decides where each goes, and so must the pre-filter.
    store.con.execute("UPDATE scores SET misalignment = 0.5, final = 0.25, plateau = 0.75 "
                      "WHERE CAST(substr(example_id, 3) AS INTEGER) % 7 = 0")
    store.con.execute("UPDATE scores SET misalignment = 'nan'::DOUBLE, final = 'nan'::DOUBLE WHERE example_id IN ('ex1', 'ex2')")
    store.con.execute("UPDATE scores SET misalignment = 'inf'::DOUBLE, final = '-inf'::DOUBLE, plateau = '-inf'::DOUBLE "
                      "WHERE example_id = 'ex3'")
    store.con.execute("UPDATE scores SET answer_verdict = 'refusal' WHERE CAST(substr(example_id, 3) AS INTEGER) % 3 = 0")
    column_order = Store._ORDERS[order]
    for limit in (1, 37, 500, 4_000):
        for exclude in (False, True):
            # The pool holds finite scores only: a NaN (fp16 overflow, a broken checkpoint) must never rank first.
            plain = store.con.execute(
                f"SELECT example_id FROM scores WHERE model_fingerprint = 'fp' AND probe_id = 'probe' AND isfinite(misalignment) "
                f"AND (NOT ? OR answer_verdict IS DISTINCT FROM 'refusal') ORDER BY {column_order} LIMIT ?",
                [exclude, limit]).fetchall()
            params: dict[str, object] = {"fp": "fp", "probe": "probe", "exclude": exclude, "as_of": None, "unclosed": False,
                                         "settings": None}
            assert limit == 4_000 or store._rank_cut(order, limit, params), "the pre-filter should apply here"
            got = store.selection("fp", "probe", order, limit, exclude_refusals=exclude)
            assert [r[0] for r in got] == [r[0] for r in plain], (order, limit, exclude)
            assert not {"ex1", "ex2", "ex3"} & {r[0] for r in got}
    store.close()


def test_pad_batch_sides() -> None:
    from probes.batching import pad_batch

    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
