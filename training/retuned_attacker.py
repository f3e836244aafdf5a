"""Adversarial training against the attacker itself (``curate finetune --robust --robust-method
adaptive``): every ``refresh_steps`` optimiser steps the activation-addition attacker is tuned
again against the model being trained, and the attacked steps train against what it found.

The random method draws actadd's layer, position and α blindly, so training covers the pushes
that were drawn; the adaptive attacker of the matrix then finds the one it missed (the last
layer at α 1–2). Here the search the evaluation's budgeted attacker makes
(``curation.experiments.budgeted_attacker``) is made inside training:

- for every (layer, post-instruction position) difference in means of the model being trained,
  the largest α whose harmless KL stays within ``kl_budget`` (the same utility budget the
  evaluation attacker is held to, so training meets the attacks that count);
- the attack's strength there is how far it raises the loss of the slice's own refusal targets
  (teacher-forced: generation inside the loop would cost more than the whole fine-tune), over
  their first ``early_tokens`` tokens where those are weighted (``training.early_tokens``);
- the ``top`` strongest places are kept, and each attacked actadd step mounts one of them;
- with ``tune_ablation``, the same for directional ablation: every place's difference in means
  ablated at every layer, kept where its KL is within the budget, ranked by the same loss rise;
  each attacked ablate step ablates one of the ``top`` strongest (an attacker re-selects the
  direction, and a model trained against one direction is open along another).

The prompts are capped per refresh (``max_prompts`` per side: the slice's harmful rows with their
targets, the retain set's harmless rows with the model's own answers), so that a robust row on the
organism trains in well under two minutes. Every hook is a context manager closed before the
search returns.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from probes.batching import pad_batch
from probes.chat import ThinkingFormat
from probes.models import LoadedModel
from probes.steering import ablate_direction, add_vector
from training.drift import encode_completions
from training.kl_budget import SteeredKl, largest_alpha_within


@dataclass(frozen=True)
class Place:
    layer: int
    position: int  # index into the difference-in-means positions (0 = the first of the last few)
    alpha: float  # actadd's strength; 0 for an ablation
    kl: float  # harmless KL of the attack: within the budget
    loss_gain: float  # rise of the refusal targets' loss under the attack
    attack: str = "actadd"  # or "ablate"


def refusal_loss(lm: LoadedModel, encoded: Sequence[tuple[list[int], int]], batch_size: int = 8) -> float:
    """Mean per-token loss of the completions in ``encoded`` ((ids, prompt length) pairs)."""
    pad = lm.tokenizer.pad_token_id or 0
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, mask = pad_batch([ids for ids, _ in chunk], pad, side="right")
            labels = torch.full_like(input_ids, -100)
            for row, (ids, plen) in enumerate(chunk):
                labels[row, plen : len(ids)] = input_ids[row, plen : len(ids)]
            logits = lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = labels[:, 1:].to(logp.device)
            keep = target != -100
            picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total += float(-picked[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


class RetunedActadd:
    """The activation-addition attacker, tuned again on demand against the model being trained."""

    def __init__(self, lm: LoadedModel, harmful: Sequence[tuple[str, str, str]], harmless: Sequence[tuple[str, str, str]],
                 fmt: ThinkingFormat, kl_budget: float, top: int = 3, max_prompts: int = 16, alpha_cap: float = 8.0,
                 tolerance: float = 0.1, early_tokens: int = 0, tune_ablation: bool = False, seed: int = 0) -> None:
        if not harmful or not harmless:
            raise ValueError("the adaptive method needs the slice's harmful rows and the retain set's harmless rows")
        rng = random.Random(seed)
        self.lm, self.fmt, self.kl_budget, self.top = lm, fmt, kl_budget, top
        self.harmful = rng.sample(list(harmful), min(max_prompts, len(harmful)))
        self.harmless = rng.sample(list(harmless), min(max_prompts, len(harmless)))
        self.harmful_ids = encode_completions(lm, self.harmful, fmt)
        if early_tokens:  # the push's strength is read where training reads it: the completion's first tokens
            self.harmful_ids = [(ids[: plen + early_tokens], plen) for ids, plen in self.harmful_ids]
        self.kl = SteeredKl(lm, self.harmless, fmt)
        self.alpha_cap, self.tolerance, self.tune_ablation = alpha_cap, tolerance, tune_ablation
        self.ablations: list[Place] = []  # the strongest within-budget ablation places at the last re-tuning
        self.history: list[list[dict[str, float]]] = []  # the places kept at each refresh

    def _alpha_at_budget(self, vector: torch.Tensor, layer: int) -> tuple[float, float]:
        model = self.lm.model
        return largest_alpha_within(lambda a: self.kl(lambda: add_vector(model, vector, [layer], -a)), self.kl_budget,
                                    self.alpha_cap, tolerance=self.tolerance, max_tries=6)

    def retune(self, vectors: torch.Tensor) -> list[Place]:
        """The ``top`` strongest within-budget actadd places for ``vectors`` ([layers, positions, hidden],
        this model's own differences in means), strongest first; with ``tune_ablation`` the strongest
        ablation places too (``ablations``)."""
        self.kl.reset()  # the model has trained since the last re-tuning
        clean = refusal_loss(self.lm, self.harmful_ids)
        scale = float(vectors.norm())
        found, ablations = [], []
        for layer in range(1, vectors.shape[0]):  # layer 0 is the embedding: template tokens differ by nothing there
            for position in range(vectors.shape[1]):
                vector = vectors[layer, position]
                if float(vector.norm()) <= 1e-6 * scale:
                    continue
                alpha, kl = self._alpha_at_budget(vector, layer)
                if alpha > 0:
                    with add_vector(self.lm.model, vector, [layer], -alpha):
                        gain = refusal_loss(self.lm, self.harmful_ids) - clean
                    found.append(Place(layer, position, alpha, kl, gain))
                if self.tune_ablation:
                    kl = self.kl(lambda v=vector: ablate_direction(self.lm.model, v))
                    if kl <= self.kl_budget:
                        with ablate_direction(self.lm.model, vector):
                            gain = refusal_loss(self.lm, self.harmful_ids) - clean
                        ablations.append(Place(layer, position, 0.0, kl, gain, "ablate"))
        found.sort(key=lambda p: -p.loss_gain)
        ablations.sort(key=lambda p: -p.loss_gain)
        kept, self.ablations = found[: self.top], ablations[: self.top]
        self.history.append([{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()}
                             for p in kept + self.ablations])
        return kept
