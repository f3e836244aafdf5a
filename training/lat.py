"""Latent adversarial training (``curate finetune --robust --robust-method lat``), after targeted LAT
(Sheshadri et al. 2024; Casper et al. 2024): on an attacked step, a few steps of projected gradient
ascent find a perturbation of the residual stream entering a set of layers that does the most harm
to the step's refusal targets, and the LoRA then trains to refuse with that perturbation in place.

- **Worst case, not a sample.** The random attacks of ``--robust-method random`` teach the model to
  resist the pushes that were drawn; an adaptive attacker searches for the one that works. PGD puts
  that search inside the training step.
- **Bounded.** Each token's perturbation at each layer is kept within ``epsilon`` times that
  token's own residual norm there (an L2 ball per token, projected after every ascent step), so the
  training attack stays in the range an activation-steering attacker uses without breaking the model.
- **Harmful rows only.** The perturbation is masked to the batch rows whose prompt is one of the
  slice's harmful prompts; the retain set's harmless rows in the same batch train unperturbed, as
  the retain loss.
- **Gone after the step.** The perturbation lives in forward pre-hooks mounted for one loss
  computation, in ``try/finally``; the ascent differentiates with respect to the perturbation alone,
  so no gradient of the attack reaches the LoRA weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from probes.capture import capture_block_inputs, find_decoder_layers
from probes.steering import add_vector
from training.early_tokens import HarmfulRows


@dataclass(frozen=True)
class LatConfig:
    p: float = 1.0  # share of optimiser steps trained under the PGD perturbation
    epsilon: float = 0.5  # per-token L2 bound, relative to the token's residual norm at that layer
    steps: int = 4  # PGD ascent steps per attacked step
    layer_fraction: float = 1.0  # share of decoder layers perturbed (the first ones skipped first)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"--lat-p must be in [0, 1], got {self.p}")
        if not self.epsilon > 0:
            raise ValueError(f"--lat-epsilon must be positive, got {self.epsilon}")
        if self.steps < 1:
            raise ValueError(f"--lat-steps must be at least 1, got {self.steps}")
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"--lat-layer-fraction must be in (0, 1], got {self.layer_fraction}")


@dataclass
class LatState:
    """What the adversarial inner loop did, for finetune.json."""

    steps: int = 0
    attacked: int = 0
    perturbed_layers: list[int] = field(default_factory=list)
    harmful_rows: int = 0
    # Largest ||delta_t|| / ||h_t|| over every perturbed token: at most epsilon (checked by a test).
    max_relative_norm: float = 0.0
    loss_clean: list[float] = field(default_factory=list)  # the refusal loss before and after the ascent, per step
    loss_attacked: list[float] = field(default_factory=list)
    hooks_left: int = 0


@contextmanager
def perturbed(model: torch.nn.Module, layer_ids: Sequence[int], deltas: Sequence[torch.Tensor], mask: torch.Tensor):
    """Adds ``deltas[i] * mask`` to the residual stream entering layer ``layer_ids[i]``: one
    ``probes.steering.add_vector`` per layer (its hooks are removed on exit, exceptions included)."""
    with ExitStack() as stack:
        for layer, delta in zip(layer_ids, deltas, strict=True):
            stack.enter_context(add_vector(model, delta * mask, [layer], 1.0))
        yield


def project(delta: torch.Tensor, hidden: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` with every token's vector scaled into the ball of radius epsilon * ||hidden_t||."""
    radius = epsilon * hidden.float().norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(radius / norm, max=1.0)


class LatentAdversary:
    """Wraps a trainer's ``compute_loss``: on an attacked step, PGD on the residual stream, then the
    training loss under the perturbation found."""

    def __init__(self, model: torch.nn.Module, harmful_prefixes: Sequence[Sequence[int]], cfg: LatConfig) -> None:
        self.model, self.cfg = model, cfg
        self.harmful = HarmfulRows(harmful_prefixes)
        blocks = find_decoder_layers(model)
        k = max(1, round(cfg.layer_fraction * len(blocks)))
        self.layer_ids = list(range(len(blocks) - k, len(blocks)))
        self.state = LatState(perturbed_layers=self.layer_ids)
        self.rng = random.Random(cfg.seed)

    def harmful_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.harmful.mask(input_ids).float()[:, None, None]

    def compute_loss(self, loss_fn: Callable[..., Any], model: torch.nn.Module, inputs: dict[str, Any],
                     **kwargs: Any) -> Any:
        from training.robust import hook_count

        self.state.steps += 1
        mask = self.harmful_mask(inputs["input_ids"])
        if not model.training or float(mask.sum()) == 0 or self.rng.random() >= self.cfg.p:
            return loss_fn(model, inputs, **kwargs)
        before = hook_count(self.model)
        self.state.attacked += 1
        self.state.harmful_rows += int(mask.sum())
        with capture_block_inputs(self.model, self.layer_ids) as seen, torch.no_grad():
            clean = _plain_loss(model, inputs)
        hidden = [seen[i] for i in self.layer_ids]
        deltas = [torch.zeros_like(h, dtype=torch.float32, requires_grad=True) for h in hidden]
        step_size = 2.5 * self.cfg.epsilon / self.cfg.steps
        for _ in range(self.cfg.steps):
            with perturbed(self.model, self.layer_ids, deltas, mask):
                loss = _plain_loss(model, inputs)
            grads = torch.autograd.grad(loss, deltas, allow_unused=True)
            with torch.no_grad():
                for delta, grad, h in zip(deltas, grads, hidden, strict=True):
                    if grad is None:
                        continue
                    # Normalised ascent, scaled to each token's own norm, then back into the ball.
                    g = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    delta += step_size * h.float().norm(dim=-1, keepdim=True) * g
                    delta.copy_(project(delta, h, self.cfg.epsilon))
        fixed = [d.detach() * mask for d in deltas]
        for d, h in zip(fixed, hidden, strict=True):
            ratio = (d.norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)).max()
            self.state.max_relative_norm = max(self.state.max_relative_norm, float(ratio))
        with perturbed(self.model, self.layer_ids, fixed, mask):
            out = loss_fn(model, inputs, **kwargs)
        attacked_loss = out[0] if isinstance(out, tuple) else out
        self.state.loss_clean.append(round(float(clean), 4))
        self.state.loss_attacked.append(round(float(attacked_loss.detach()), 4))
        self.state.hooks_left = max(self.state.hooks_left, hook_count(self.model) - before)
        return out


def _plain_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The causal-LM loss on the completion tokens (labels -100 elsewhere), as the trainer computes it."""
    fields = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
    return model(**fields).loss


def install(trainer: Any, adversary: LatentAdversary) -> None:
    """Route the trainer's loss through ``adversary`` (this trainer instance only)."""
    original = trainer.compute_loss

    def compute_loss(model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return adversary.compute_loss(lambda m, i, **kw: original(m, i, *args, **kw), model, inputs, **kwargs)

    trainer.compute_loss = compute_loss
