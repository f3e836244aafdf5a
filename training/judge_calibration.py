"""Calibrating the relevance judge without overfitting it (``curate judge --calibrate``).

The labelled pairs are split once into dev and test by a fixed hash of the pair's
text (request and answer), so a pair lands in the same half on every machine and
in every run, whatever the file order, and adding rows never moves the old ones.
Only the dev half is searched; the test half is measured once, with the chosen
thresholds, and reported beside it. The search is a small grid over the two
cosines that carry the decision (``deliver_cosine``, ``topic_cosine``): two
numbers fitted on hundreds of pairs, not a model that can learn the set by heart.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from training.judge_agreement import agreement
from training.judge_outcomes import outcome_verdict

TEST_SHARE_BYTE = 96  # hash byte < 96 of 256: 37.5% of the pairs are held out as test
GRID = {
    "deliver_cosine": [round(0.25 + 0.05 * i, 2) for i in range(11)],  # 0.25 … 0.75
    "topic_cosine": [round(0.10 + 0.05 * i, 2) for i in range(10)],  # 0.10 … 0.55
}


def split_of(prompt: str, answer: str) -> str:
    digest = hashlib.sha256(f"{prompt}\x00{answer}".encode("utf-8", "surrogatepass")).digest()
    return "test" if digest[0] < TEST_SHARE_BYTE else "dev"


@dataclass(frozen=True)
class Calibration:
    thresholds: dict[str, float]
    dev: dict[str, Any]
    test: dict[str, Any] | None
    n_dev: int
    n_test: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(judge: Any, prompts: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> Calibration:
    """Thresholds that maximise dev agreement (ties: the higher refusal recall, then the grid's
    first), and the dev and test figures with them."""
    splits = [split_of(p, a) for p, a in zip(prompts, answers, strict=True)]
    dev = [i for i, s in enumerate(splits) if s == "dev"]
    test = [i for i, s in enumerate(splits) if s == "test"]
    if len(dev) < 20:
        raise ValueError(f"--calibrate needs at least 20 labelled pairs in the dev half (got {len(dev)} of {len(splits)})")
    read = judge.embed(prompts, answers)  # the encoder runs once; each grid point only re-applies thresholds

    def figures(candidate: Any, rows: list[int]) -> Any:
        verdicts = [outcome_verdict(candidate.decide(read[i]).outcome) for i in rows]
        return agreement([labels[i] for i in rows], verdicts)

    best: tuple[float, float] | None = None
    chosen = judge
    for deliver, topic in itertools.product(GRID["deliver_cosine"], GRID["topic_cosine"]):
        candidate = judge.with_thresholds(deliver_cosine=deliver, topic_cosine=topic)
        a = figures(candidate, dev)
        key = (a.agreement, a.recall_refusal or 0.0)
        if best is None or key > best:
            best, chosen = key, candidate
    return Calibration(
        thresholds=dict(asdict(chosen.thresholds)),
        dev=figures(chosen, dev).as_json(),
        test=figures(chosen, test).as_json() if test else None,
        n_dev=len(dev),
        n_test=len(test),
    )
