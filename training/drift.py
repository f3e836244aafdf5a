"""Capability drift: how far a fine-tune moved the model on ordinary requests.

The base model's own answers to harmless prompts are teacher-forced through
both models; drift is the mean per-token KL(base ‖ tuned) over the assistant
turn (reasoning, close marker, answer). Zero means the tuned model predicts
those answers exactly as the base model did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from probes.batching import pad_batch
from probes.chat import ThinkingFormat, build_completion, render_generation_prompt
from probes.models import LoadedModel


def encode_completions(lm: LoadedModel, pairs: Sequence[tuple[str, str, str]], fmt: ThinkingFormat) -> list[tuple[list[int], int]]:
    """(ids of generation prompt + completion, prompt length) for each (prompt, reasoning, answer)."""
    out = []
    for prompt, reasoning, answer in pairs:
        prompt_ids = lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, prompt, fmt), add_special_tokens=False)
        completion_ids = lm.tokenizer.encode(build_completion(reasoning, answer, fmt), add_special_tokens=False)
        out.append((prompt_ids + completion_ids, len(prompt_ids)))
    return out


@torch.no_grad()
def harmless_kl(
    base: LoadedModel,
    tuned: LoadedModel,
    pairs: Sequence[tuple[str, str, str]],
    fmt: ThinkingFormat,
    *,
    batch_size: int = 8,
    tuned_context: Callable[[], AbstractContextManager[object]] | None = None,
) -> float:
    """Mean per-token KL(base ‖ tuned) over the completions of ``pairs``
    (prompt, reasoning, answer), which should be the base model's own answers.

    ``tuned_context`` is entered around the tuned model's passes only: with
    ``tuned`` the same model as ``base`` and a steering attack as the context,
    this is the attack's own damage to ordinary answers."""
    if not pairs:
        raise ValueError("drift needs at least one harmless (prompt, reasoning, answer) pair")
    encoded = encode_completions(base, pairs, fmt)
    pad = base.tokenizer.pad_token_id or 0
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        input_ids, mask = pad_batch([ids for ids, _ in chunk], pad, side="right")
        target = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, (ids, plen) in enumerate(chunk):
            target[row, plen - 1 : len(ids) - 1] = True  # logits that predict completion tokens
        logp = F.log_softmax(base.model(input_ids=input_ids.to(base.device), attention_mask=mask.to(base.device)).logits.float(), -1)
        with (tuned_context or nullcontext)():
            logq = F.log_softmax(tuned.model(input_ids=input_ids.to(tuned.device), attention_mask=mask.to(tuned.device)).logits.float(), -1)
        kl = (logp.exp() * (logp - logq.to(logp.device))).sum(-1)
        sel = target.to(kl.device)
        total += float(kl[sel].sum())
        count += int(sel.sum())
    return total / max(count, 1)
