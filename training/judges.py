"""Every judge by name: what ``--judge`` chooses from (the one place that knows them all)."""

from __future__ import annotations

from training.judge import Judge, SubstringJudge
from training.judge_context import ContextJudge

JUDGE_NAMES = ("substring", "context")


def make_judge(name: str) -> Judge:
    if name == "substring":
        return SubstringJudge()
    if name == "context":
        return ContextJudge()
    raise ValueError(f"--judge must be one of {', '.join(JUDGE_NAMES)}, got {name!r}")
