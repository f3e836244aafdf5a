"""Refusal that is more than a few tokens deep (``--robust-early-tokens K``), after Qi et al. 2024,
"Safety Alignment Should Be Made More Than Just a Few Tokens Deep".

A steering attack wins or loses in the first tokens of the reasoning: a model pushed off its
refusal writes an opening that commits it ("Okay, this is a friendly question…") and the rest
follows. The supervised loss is a mean over every completion token, so those few deciding tokens
weigh almost nothing beside a long trace, and training under an attack can drive the loss down
without the model learning to open its answer the refusing way. This module adds, on the batch
rows whose prompt is one of the slice's harmful prompts, ``weight`` times the mean loss of their
first ``k`` completion tokens. That forward reads only prompt + ``k`` tokens, so it is cheap
beside the full-sequence one, and it runs under whatever attack the step has mounted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


class HarmfulRows:
    """Which rows of a training batch start with one of the slice's harmful generation prompts."""

    def __init__(self, prefixes: Sequence[Sequence[int]]) -> None:
        self.prefixes = [tuple(p) for p in prefixes if p]

    def mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = [tuple(r.tolist()) for r in input_ids]
        flags = [any(r[: len(p)] == p for p in self.prefixes) for r in rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def early_token_loss(model: torch.nn.Module, inputs: dict[str, Any], rows: torch.Tensor, k: int) -> torch.Tensor | None:
    """Mean loss of the first ``k`` completion tokens (labels not -100) of the rows in ``rows``;
    None when no such row has a completion."""
    labels = inputs["labels"]
    pieces: list[tuple[torch.Tensor, int]] = []
    for i in torch.nonzero(rows).flatten().tolist():
        trained = torch.nonzero(labels[i] != -100).flatten()
        if len(trained) == 0:
            continue
        start = int(trained[0])
        end = min(start + k, int(trained[-1]) + 1)
        pieces.append((inputs["input_ids"][i, :end], start))
    if not pieces:
        return None
    width = max(len(ids) for ids, _ in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long, device=labels.device)
    mask = torch.zeros_like(ids)
    for row, (seq, _) in enumerate(pieces):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    losses = []
    for row, (seq, start) in enumerate(pieces):
        # Logits at t predict token t + 1: the completion's first token is predicted at start - 1.
        losses.append(F.cross_entropy(logits[row, start - 1 : len(seq) - 1], seq[start:], reduction="sum"))
    return torch.stack(losses).sum() / sum(len(seq) - start for seq, start in pieces)


@dataclass
class EarlyTokenState:
    steps: int = 0
    rows: int = 0
    loss: list[float] = field(default_factory=list)  # the early-token loss, every 10th step


def install(trainer: Any, harmful: HarmfulRows, k: int, weight: float) -> EarlyTokenState:
    """Add ``weight`` x the early-token loss of the harmful rows to the trainer's loss (this trainer only)."""
    original = trainer.compute_loss
    state = EarlyTokenState()

    def compute_loss(model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        out = original(model, inputs, *args, **kwargs)
        if not model.training:
            return out
        rows = harmful.mask(inputs["input_ids"])
        extra = early_token_loss(model, inputs, rows, k) if bool(rows.any()) else None
        if extra is None:
            return out
        state.steps += 1
        state.rows += int(rows.sum())
        if state.steps % 10 == 1:
            state.loss.append(round(float(extra.detach()), 4))
        if isinstance(out, tuple):
            return (out[0] + weight * extra, *out[1:])
        return out + weight * extra

    trainer.compute_loss = compute_loss
    return state
