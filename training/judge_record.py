"""Each offline judge's measured agreement on the held-out halves of the labelled sets, kept in
``training/data/judge_agreement.json`` so a run's report can name its judge *and* how far that judge
agrees with people (``curate evaluate``'s JSON, the demo's report). The file is written by
``python -m training.judge_record`` and checked by tests/test_judge_floor.py, which re-measures the
default judge and fails when the record no longer matches what the code measures.

A classifier judge has no record here: no classifier weights are on this project's machines, so
its agreement is reported as not measured rather than borrowed from a model card.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from training.judge_agreement import agreement
from training.judge_calibration import split_of

RECORD = Path(__file__).parent / "data" / "judge_agreement.json"
OURS = Path(__file__).parent / "data" / "judge_labels.jsonl"
SETS = ("pyrit-refusal", "ours")


def held_out_rows(name: str) -> list[dict[str, Any]]:
    from training.label_sets import load_label_set

    rows = [json.loads(line) for line in OURS.read_text().splitlines()] if name == "ours" else load_label_set(name)
    return [r for r in rows if split_of(r["prompt"], r["answer"]) == "test"]


def measure(judge_name: str) -> dict[str, dict[str, Any]]:
    from training.judges import make_judge

    judge = make_judge(judge_name)
    figures: dict[str, dict[str, Any]] = {}
    for name in SETS:
        rows = held_out_rows(name)
        verdicts = judge.judge_pairs([r["prompt"] for r in rows], [r["answer"] for r in rows])
        a = agreement([r["label"] for r in rows], verdicts)
        figures[name] = {"split": "test", "n": a.n, "agreement": round(a.agreement, 4),
                         "precision_refusal": None if a.precision_refusal is None else round(a.precision_refusal, 4),
                         "recall_refusal": None if a.recall_refusal is None else round(a.recall_refusal, 4)}
    return figures


def recorded(judge_name: str) -> dict[str, Any] | None:
    """The judge's recorded held-out figures, or None (a classifier, or a judge never measured)."""
    doc = json.loads((resources.files("training") / "data" / "judge_agreement.json").read_text())
    return doc["judges"].get(judge_name)


def agreement_line(judge_name: str, figures: dict[str, Any] | None) -> str:
    """One line for a run's summary: the judge and its agreement on labels written elsewhere."""
    measured = (figures or {}).get("pyrit-refusal")
    if not measured:
        return f"judge {judge_name}: agreement with human labels not measured on this project's machines"
    return (f"judge {judge_name}: {100 * measured['agreement']:.1f}% agreement, refusal recall "
            f"{100 * measured['recall_refusal']:.1f}% on {measured['n']} held-out human labels written elsewhere "
            "(PyRIT's refusal set; docs/judges.md)")


def agreement_table(judge_name: str, figures: dict[str, Any] | None) -> tuple[list[list[Any]], list[str]]:
    """(rows, header) of the judge's held-out figures, for a report's table."""
    rows = [[judge_name, name, f["n"], f["agreement"], f["precision_refusal"], f["recall_refusal"]]
            for name, f in (figures or {}).items()] or [[judge_name, "not measured on this project's machines", "", "", "", ""]]
    return rows, ["judge", "held-out labels", "pairs", "agreement", "refusal precision", "refusal recall"]


def main() -> None:
    from training.judges import OFFLINE_JUDGES

    doc = {"about": "held-out (test) halves of the fixed sha256 split; written by python -m training.judge_record",
           "judges": {name: measure(name) for name in OFFLINE_JUDGES}}
    RECORD.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["judges"], indent=2))


if __name__ == "__main__":
    main()
