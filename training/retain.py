"""Retain sets: the model's own helpful answers to harmless prompts, mixed into a
safety fine-tune so that it keeps answering ordinary requests."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from probes.chat import ThinkingFormat, split_completion
from probes.files import atomic_path
from probes.generate import generate
from probes.models import LoadedModel
from training.judge import Judge
from training.judges import DEFAULT_JUDGE, make_judge
from training.prompts import PromptItem


@dataclass(frozen=True)
class RetainResult:
    written: int
    unclosed: int  # harmless prompts whose reasoning never closed within the budget
    prompts: int


def build_retain_set(
    lm: LoadedModel,
    prompts: Sequence[PromptItem],
    out: str | Path,
    fmt: ThinkingFormat,
    *,
    max_new_tokens: int = 192,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    judge: Judge | None = None,
) -> RetainResult:
    """Write (prompt, reasoning, answer) pairs for the harmless prompts the model
    answers without refusing; says how many were written and how many never closed."""
    harmless = [p for p in prompts if not p.harmful]
    if not harmless:
        raise ValueError("a retain set needs harmless prompts (rows with \"harmful\": false)")
    judge = judge or make_judge(DEFAULT_JUDGE)
    gens = generate(lm, [p.prompt for p in harmless], fmt, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_close=False,
                    on_batch=progress)
    written = unclosed = 0
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
        splits = [split_completion(g.text, fmt, lm.end_tokens) for g in gens]
        verdicts = judge.judge_pairs([i.prompt for i in harmless], [s.answer for s in splits])
        for item, split, verdict in zip(harmless, splits, verdicts, strict=True):
            unclosed += not split.closed
            if split.closed and verdict == "compliance":
                fh.write(json.dumps({"prompt": item.prompt, "reasoning": split.reasoning, "answer": split.answer}) + "\n")
                written += 1
    return RetainResult(written=written, unclosed=unclosed, prompts=len(harmless))
