"""How far a judge agrees with human labels: the figures a team reads before it
trusts a judge with its evaluation (``curate judge --labels``).

Labels are ``refusal`` / ``compliance`` (any case) or ``1`` / ``0`` (refusal /
compliance). The refusal class is the positive one: precision is the share of
the judge's refusals that people labelled refusals, recall the share of
people's refusals the judge found. A two-way label asks "was the request
delivered?", so every outcome that does not deliver (``refused``, ``off_topic``,
``degenerate``, and a rule judge's empty answer) counts as refusal against it.
An output a model judge could not parse is a failed row: it counts as a
disagreement and is shown in its own column, never folded into either class.
``outcome_confusion`` keeps the four outcomes apart, label by label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LABEL_VALUES = {"refusal": "refusal", "compliance": "compliance", "1": "refusal", "0": "compliance",
                "true": "refusal", "false": "compliance"}


def read_label(value: Any) -> str | None:
    """``refusal`` or ``compliance`` for a label value, None when it is not one."""
    if isinstance(value, bool):
        return "refusal" if value else "compliance"
    if isinstance(value, int | float) and value in (0, 1):
        return "refusal" if value == 1 else "compliance"
    if isinstance(value, str):
        return LABEL_VALUES.get(value.strip().lower())
    return None


@dataclass(frozen=True)
class Agreement:
    n: int
    agreement: float
    precision_refusal: float | None
    recall_refusal: float | None
    confusion: dict[str, dict[str, int]]  # label -> verdict -> count

    def as_json(self) -> dict[str, Any]:
        return {"n": self.n, "agreement": self.agreement, "precision_refusal": self.precision_refusal,
                "recall_refusal": self.recall_refusal, "confusion": self.confusion}


def _delivered(verdict: str) -> str | None:
    """A verdict as the two-way label reads it: an empty / degenerate answer delivered nothing."""
    return {"refusal": "refusal", "no_answer": "refusal", "compliance": "compliance"}.get(verdict)


def outcome_confusion(labels: Sequence[str], outcomes: Sequence[str]) -> dict[str, dict[str, int]]:
    """label -> outcome -> count, over the four outcomes (and ``unparsed`` for failed rows)."""
    from training.judge_outcomes import OUTCOMES

    pairs = Counter(zip(labels, outcomes, strict=True))
    return {label: {o: pairs[(label, o)] for o in (*OUTCOMES, "unparsed")} for label in ("refusal", "compliance")}


def agreement(labels: Sequence[str], verdicts: Sequence[str]) -> Agreement:
    if len(labels) != len(verdicts):
        raise ValueError(f"{len(labels)} labels but {len(verdicts)} verdicts")
    if not labels:
        raise ValueError("no labelled rows to compare with")
    pairs = Counter(zip(labels, verdicts, strict=True))
    same = sum(n for (label, verdict), n in pairs.items() if label == _delivered(verdict))
    judged_refusal = sum(n for (_, verdict), n in pairs.items() if _delivered(verdict) == "refusal")
    labelled_refusal = sum(n for (label, _), n in pairs.items() if label == "refusal")
    hits = pairs[("refusal", "refusal")] + pairs[("refusal", "no_answer")]
    confusion = {label: {verdict: pairs[(label, verdict)] for verdict in ("refusal", "compliance", "no_answer", "unparsed")}
                 for label in ("refusal", "compliance")}
    return Agreement(
        n=len(labels),
        agreement=same / len(labels),
        precision_refusal=hits / judged_refusal if judged_refusal else None,
        recall_refusal=hits / labelled_refusal if labelled_refusal else None,
        confusion=confusion,
    )
