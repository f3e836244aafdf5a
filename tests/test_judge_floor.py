"""The default judge's floor on labels it was not tuned on: CI fails when agreement on the held-out
(test) half of the packaged labelled set drops below it. The packaged thresholds were not fitted to
any of these labels (training/data/relevance_judge.json says where they come from), so the test half
is held out twice over; the floor is the measured figure less a small margin for library drift."""

from __future__ import annotations

import json
from pathlib import Path

from training.judge_agreement import agreement
from training.judge_calibration import split_of
from training.judge_relevance import RelevanceJudge

LABELLED = Path(__file__).parent.parent / "training" / "data" / "judge_labels.jsonl"
AGREEMENT_FLOOR = 0.80  # measured 2026-12-05: see docs/judges.md
RECALL_FLOOR = 0.65


def test_relevance_judge_holds_its_floor_on_the_held_out_half() -> None:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    test = [r for r in rows if split_of(r["prompt"], r["answer"]) == "test"]
    assert len(test) >= 40
    verdicts = RelevanceJudge().judge_pairs([r["prompt"] for r in test], [r["answer"] for r in test])
    a = agreement([r["label"] for r in test], verdicts)
    assert a.agreement >= AGREEMENT_FLOOR and (a.recall_refusal or 0) >= RECALL_FLOOR, a.as_json()
