"""Training targets that fit, and proof of what was trained on.

TRL truncates a sequence longer than ``max_length`` from the end, so on a
1–4k-token reasoning trace the close marker and the refusal, the very tokens
the fine-tune is for, are what is cut. Here no target is truncated silently:
each pair is rendered in the model's own format and counted before training;
one that does not fit is dropped with a count and a warning (``drop``, the
default: a long tail should not stop a run) or stops the run naming the
example (``error``). After the trainer has tokenized the data, every
example's labels (the tokens the loss is on, after TRL's own collator) are
decoded and checked for the close marker and the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.chat import ThinkingFormat, build_completion, render_generation_prompt

TOO_LONG = ("drop", "error")


def fit_targets(tokenizer: Any, pairs: Sequence[dict[str, Any]], fmt: ThinkingFormat, max_length: int,
                too_long: str = "drop") -> tuple[list[dict[str, str]], list[dict[str, Any]], list[str]]:
    """(prompt-completion rows that fit, the dropped examples with their lengths, the kept rows' answers)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"--too-long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    rows, dropped, answers = [], [], []
    for i, pair in enumerate(pairs):
        prompt = render_generation_prompt(tokenizer, pair["prompt"], fmt)
        completion = build_completion(pair["reasoning"], pair["answer"], fmt)
        # + 1: the end-of-sequence token TRL appends to a completion
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids) + len(tokenizer(completion, add_special_tokens=False).input_ids) + 1
        if n > max_length:
            where = pair.get("id") or f"pair {i + 1}"
            if too_long == "error":
                raise ValueError(f"training example {where} is {n} tokens, over --max-length {max_length}; "
                                 "raise --max-length or pass --too-long drop")
            dropped.append({"example": where, "tokens": n})
            continue
        rows.append({"prompt": prompt, "completion": completion})
        answers.append(pair["answer"])
    return rows, dropped, answers


def check_trained_labels(trainer: Any, tokenizer: Any, close_marker: str, answers: Sequence[str]) -> dict[str, Any]:
    """Decode each example's labels as the trainer's collator makes them and count those holding
    the close marker and the start of the answer."""
    ok, missing = 0, []
    for i in range(len(trainer.train_dataset)):
        labels = trainer.data_collator([trainer.train_dataset[i]])["labels"][0]
        text = tokenizer.decode(labels[labels != -100])
        if close_marker in text and answers[i].strip()[:40] in text:
            ok += 1
        else:
            missing.append(i)
    return {"examples": len(trainer.train_dataset), "with_close_marker_and_answer": ok, "missing": missing[:20]}
