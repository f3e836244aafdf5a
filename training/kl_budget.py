"""A utility budget for steering attacks: how far a push may go before it breaks the model.

Both attackers that are held to a budget use this module: the budgeted adaptive attacker of the
attack matrix (``curation.experiments.budgeted_attacker``) and the re-tuned attacker that
``--robust-method adaptive`` trains against (``training.retuned_attacker``).

- ``SteeredKl``: per-token KL(model ‖ model under a steering context) over fixed harmless
  completions (the model's own answers). The unsteered side is computed once and kept while it
  is small (``cache_bytes``), so a search that tries many pushes pays one forward pass per try;
  a large vocabulary and long answers fall back to recomputing it.
- ``largest_alpha_within``: the largest α whose KL stays within the budget. KL grows about as
  α² for small pushes, so each try aims at the budget by interpolating log KL against log α
  between the tightest bracket so far (a bisection step where that cannot be done), and the
  search stops once the bracket is within ``tolerance``: a handful of tries where plain
  bisection to the same precision takes twice as many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from probes.batching import pad_batch
from probes.chat import ThinkingFormat
from probes.models import LoadedModel
from training.drift import encode_completions


class SteeredKl:
    """Mean per-token KL of ``lm`` against itself under a context, over fixed completions."""

    def __init__(self, lm: LoadedModel, pairs: Sequence[tuple[str, str, str]], fmt: ThinkingFormat, *,
                 batch_size: int = 8, cache_bytes: int = 256 << 20) -> None:
        if not pairs:
            raise ValueError("a KL budget needs at least one harmless (prompt, reasoning, answer) pair")
        self.lm, self.cache_bytes = lm, cache_bytes
        encoded = encode_completions(lm, pairs, fmt)
        pad = lm.tokenizer.pad_token_id or 0
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, mask = pad_batch([ids for ids, _ in chunk], pad, side="right")
            target = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, (ids, plen) in enumerate(chunk):
                target[row, plen - 1 : len(ids) - 1] = True  # the logits that predict completion tokens
            self.batches.append((input_ids, mask, target))
        self.reference: list[torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the unsteered side (the model has changed since it was computed)."""
        self.reference = None

    def _log_probs(self, input_ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        device = self.lm.device
        logits = self.lm.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        return F.log_softmax(logits, -1)[target.to(device)]

    @torch.no_grad()
    def __call__(self, context: Callable[[], AbstractContextManager[object]]) -> float:
        if self.reference is None:
            vocab = self.lm.model.get_output_embeddings().weight.shape[0]
            tokens = sum(int(t.sum()) for _, _, t in self.batches)
            keep = tokens * vocab * 4 <= self.cache_bytes
            reference = [self._log_probs(*b) for b in self.batches] if keep else None
        else:
            reference = self.reference
        total, count = 0.0, 0
        for i, batch in enumerate(self.batches):
            logp = reference[i] if reference is not None else self._log_probs(*batch)
            with context():
                logq = self._log_probs(*batch)
            total += float((logp.exp() * (logp - logq)).sum())
            count += logp.shape[0]
        if reference is not None:
            self.reference = reference
        return total / max(count, 1)


def largest_alpha_within(kl_at: Callable[[float], float], budget: float, cap: float, *, tolerance: float = 0.05,
                         max_tries: int = 8) -> tuple[float, float]:
    """(α, KL at α): the largest α in (0, cap] found with KL ≤ ``budget``, assuming KL grows with α;
    (0, 0) when even the smallest try is over. The answer is within ``tolerance`` (relative) of the
    crossing unless ``max_tries`` ran out first."""
    tried: dict[float, float] = {}

    def at(alpha: float) -> float:
        if alpha not in tried:
            tried[alpha] = kl_at(alpha)
        return tried[alpha]

    first = min(1.0, cap)
    lo, hi = (first, None) if at(first) <= budget else (None, first)
    while len(tried) < max_tries:
        if hi is None:  # everything so far within budget: aim past it, up to the cap
            assert lo is not None
            if lo >= cap:
                break
            k = at(lo)
            guess = cap if k <= 0 else min(cap, max(lo * 1.5, lo * math.sqrt(budget / k)))
        elif lo is None:  # everything so far over budget: aim below
            k = at(hi)
            guess = hi * min(0.5, math.sqrt(budget / k))
            if guess < 1e-4 * cap:
                break
        else:
            if hi / lo <= 1 + tolerance:
                break
            k_lo, k_hi = at(lo), at(hi)
            guess = (lo + hi) / 2
            if 0 < k_lo < budget < k_hi:  # interpolate log KL in log α, kept inside the bracket
                t = (math.log(budget) - math.log(k_lo)) / (math.log(k_hi) - math.log(k_lo))
                guess = min(max(math.exp(math.log(lo) + t * math.log(hi / lo)), lo * (1 + tolerance / 2)), hi / (1 + tolerance / 2))
        if at(guess) <= budget:
            lo = guess if lo is None else max(lo, guess)
        else:
            hi = guess if hi is None else min(hi, guess)
    return (lo, tried[lo]) if lo is not None else (0.0, 0.0)
