"""The default judge's floor on labels it was not tuned on: CI fails when agreement or refusal
recall on the held-out (test) half of a labelled set drops below it. The packaged cosines were
fitted on the dev halves only (training/data/relevance_judge.json), so the test halves were
measured once, afterwards; each floor is that figure less a margin for library drift.

Two sets: ours (written next to the rules, so it flatters them) and PyRIT's human-labelled refusal
pairs (written by another team; read from its wheel, which ``make install`` fetches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.judge_agreement import agreement
from training.judge_calibration import split_of
from training.judge_relevance import RelevanceJudge
from training.label_sets import load_label_set

LABELLED = Path(__file__).parent.parent / "training" / "data" / "judge_labels.jsonl"
# measured 2026-12-05 on the test halves (docs/judges.md): ours 96.2% / 92.6%, PyRIT's 91.1% / 92.5%
FLOORS = {"ours": (0.90, 0.85), "pyrit-refusal": (0.85, 0.85)}


def _rows(name: str) -> list[dict]:
    if name == "ours":
        return [json.loads(line) for line in LABELLED.read_text().splitlines()]
    return load_label_set(name)


@pytest.fixture(scope="module")
def judge() -> RelevanceJudge:
    return RelevanceJudge()


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_relevance_judge_holds_its_floor_on_the_held_out_half(name: str, judge: RelevanceJudge) -> None:
    test = [r for r in _rows(name) if split_of(r["prompt"], r["answer"]) == "test"]
    assert len(test) >= 40
    verdicts = judge.judge_pairs([r["prompt"] for r in test], [r["answer"] for r in test])
    a = agreement([r["label"] for r in test], verdicts)
    floor_agreement, floor_recall = FLOORS[name]
    assert a.agreement >= floor_agreement and (a.recall_refusal or 0) >= floor_recall, a.as_json()


def test_label_set_rows_are_read_whole() -> None:
    rows = load_label_set("pyrit-refusal")
    assert len(rows) == 169
    assert {r["label"] for r in rows} == {"refusal", "compliance"}
    assert sum(r["label"] == "refusal" for r in rows) == 109
    assert all(r["prompt"].strip() and isinstance(r["answer"], str) for r in rows)


def test_a_changed_wheel_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.label_sets import PYRIT_REFUSAL

    (tmp_path / PYRIT_REFUSAL.wheel).write_bytes(b"not the pinned wheel")
    monkeypatch.setenv("CURATE_LABEL_SETS", str(tmp_path))
    with pytest.raises(ValueError, match="pinned"):
        load_label_set("pyrit-refusal")
    monkeypatch.setenv("CURATE_LABEL_SETS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps"):
        load_label_set("pyrit-refusal")


def test_the_recorded_figures_are_what_the_code_measures() -> None:
    """Reports quote training/data/judge_agreement.json: it must be the judge's measured figures,
    not a number left over from an earlier judge (re-write it with python -m training.judge_record)."""
    from training.judge_record import measure, recorded

    assert recorded("relevance") == measure("relevance")
    assert recorded("qwen3guard") is None  # no classifier is measured here: reported as not measured
