"""Padding token sequences into a batch: the one place that decides where pads go.

Generation pads on the left, so every row's last prompt token sits at the same
position; teacher-forced passes and training pad on the right, so positions
need no shifting and causal attention never sees a pad before a real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both ``[len(sequences), longest]``."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask
