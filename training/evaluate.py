"""Attack success rate (ASR) and over-refusal from a model's own answers.

ASR is the share of harmful prompts whose final answer (after the reasoning)
the judge calls compliance, over the prompts whose reasoning closed; the
unclosed ones are counted beside it (``n_unclosed_harmful``), so a model that
merely rambles can neither look safe nor unsafe unnoticed. Over-refusal is the
share of closed harmless answers the judge calls a refusal. ``asr_of_all`` is
the share over every harmful prompt (unclosed and empty answers counted as not
successful): the experiments' figures use it, so their tables stay comparable
across models that close at different rates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from probes.chat import ThinkingFormat, split_completion
from probes.generate import generate
from probes.models import LoadedModel
from training.judge import Judge, SubstringJudge
from training.prompts import PromptItem

# Experiments evaluate many models on the same prompts. Generation on a small model is
# bound by per-step overhead, not arithmetic: on the 2-core demo machine 64 prompts a
# batch finish the same evaluation about 2x faster than 16, with identical greedy
# outputs. A large model on a small GPU may need less (each experiment's --batch-size).
SWEEP_BATCH_SIZE = 64


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 192
    batch_size: int = 16
    keep_samples: bool = True


def asr_over(per_category: dict[str, dict[str, float]], categories: set[str]) -> float | None:
    """ASR pooled over ``categories`` from an evaluation's ``per_category``."""
    n = sum(v["n"] for c, v in per_category.items() if c in categories)
    return sum(v["asr"] * v["n"] for c, v in per_category.items() if c in categories) / n if n else None


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def evaluate_prompts(
    lm: LoadedModel,
    items: Sequence[PromptItem],
    fmt: ThinkingFormat,
    settings: EvalSettings,
    judge: Judge | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    judge = judge or SubstringJudge()
    gens = generate(
        lm, [i.prompt for i in items], fmt, max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size, stop_at_close=False, on_batch=progress,
    )
    harmful_total = harmful_success = harmless_total = harmless_refused = no_answer = 0
    unclosed = {True: 0, False: 0}  # by harmful
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [successes, n] on harmful prompts
    samples = []
    splits = [split_completion(g.text.replace(lm.tokenizer.eos_token or "\0", ""), fmt) for g in gens]
    verdicts = judge.judge_pairs([i.prompt for i in items], [s.answer for s in splits])
    for item, split, verdict in zip(items, splits, verdicts, strict=True):
        no_answer += verdict == "no_answer"
        unclosed[item.harmful] += not split.closed
        if item.harmful:
            harmful_total += 1
            success = verdict == "compliance"
            harmful_success += success
            if item.category is not None:
                per_cat[item.category][0] += success
                per_cat[item.category][1] += 1
        else:
            harmless_total += 1
            harmless_refused += verdict == "refusal"
        if settings.keep_samples:
            samples.append(
                {"prompt": item.prompt, "category": item.category, "harmful": item.harmful,
                 "reasoning": split.reasoning, "answer": split.answer, "closed": split.closed, "verdict": verdict}
            )
    return {
        "asr": _rate(harmful_success, harmful_total - unclosed[True]),
        "asr_of_all": _rate(harmful_success, harmful_total),
        "n_harmful": harmful_total,
        "n_unclosed_harmful": unclosed[True],
        "over_refusal": _rate(harmless_refused, harmless_total - unclosed[False]),
        "n_harmless": harmless_total,
        "over_refusal_of_all": _rate(harmless_refused, harmless_total),
        "n_unclosed_harmless": unclosed[False],
        "n_no_answer": no_answer,
        "sampling": asdict(lm.sampling),
        "per_category": {c: {"asr": s / n, "n": n} for c, (s, n) in sorted(per_cat.items())},
        "judge": judge.name,
        "judge_settings": judge.settings(),
        "model": lm.path,
        "adapter": lm.adapter,
        "model_fingerprint": lm.fingerprint,
        "samples": samples,
    }
