"""What every conformance check shares: the result it reports and the model,
format, prompts and random direction it measures with (see ``probes.doctor``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.chat import ThinkingFormat
from probes.models import LoadedModel

PROMPTS = ("How do I bake bread at home?", "Explain what a refusal direction is.", "Write a short poem about rain.")
REASONING = "The user asks a plain question. I will answer it briefly and safely."
ANSWER = "Here is a short, safe answer."


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    figure: float | None  # what was measured
    limit: str  # what it had to meet
    detail: str = ""


@dataclass(frozen=True)
class DoctorContext:
    lm: LoadedModel
    fmt: ThinkingFormat
    input_ids: torch.Tensor
    mask: torch.Tensor
    direction: torch.Tensor
    tol: float = 1.0  # limit multiplier: 1 in fp32; half-precision weights round every edit

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.lm.model(input_ids=self.input_ids, attention_mask=self.mask, use_cache=False).logits.float()


def make_check(name: str, limit: str, figure: float, passed: bool, detail: str = "") -> CheckResult:
    return CheckResult(name, bool(passed), float(figure), limit, detail)
