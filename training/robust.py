"""Attack-in-the-loop fine-tuning (``curate finetune --robust``): the model learns to
refuse without leaning on its refusal direction, so that steering it away from
that direction no longer turns refusals into compliance.

With probability ``p`` per optimiser step the step's batch is trained with an
attack mounted (after DeepRefusal, arXiv 2509.15202, and ReFAT, arXiv 2409.20089):

- ``ablate``: the refusal direction is projected out of the residual stream at
  a random ``layer_fraction`` of the layers (at every position);
- ``actadd``: the difference in means at a random layer and a random one of
  the last post-instruction positions, times a coefficient drawn from
  ``coefficients``, is subtracted from the residual stream entering that layer
  (an attacker tunes exactly these three, so training draws them all);
- ``expert-mask`` (mixture-of-experts models, with a kit): the ``expert_k``
  experts most associated with refusal are masked in the router.

The direction is the difference in means of the model being trained, between
the harmful prompts of the slice and the harmless prompts of the retain set,
at the (layer, position) an attack kit chose on validation prompts (or, with no
kit, the middle layer's last post-instruction token), refreshed every
``refresh_steps`` steps as the adapter moves it. Every hook is mounted in a
context manager for one step and removed at its end, at the end of training,
and on any exception (``close``); the saved adapter holds no trace of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from probes.capture import find_decoder_layers
from probes.chat import ThinkingFormat
from probes.directions import DirectionSettings, extract_refusal_direction
from probes.experts import scale_expert_routing
from probes.models import LoadedModel
from probes.steering import ablate_direction, add_vector
from training.retuned_attacker import Place, RetunedActadd

ROBUST_ATTACKS = ("ablate", "actadd", "expert-mask")
# random: the sampled attacks above; lat: latent adversarial training (training.lat), PGD on the residual stream;
# adaptive: the sampled attacks, with actadd's place and strength re-tuned against the model being trained
# within a KL budget (training.retuned_attacker).
ROBUST_METHODS = ("random", "lat", "adaptive")


@dataclass(frozen=True)
class RobustConfig:
    # Defaults: the best mean worst-case validation ASR over both organisms (curate experiment robust-sweep; README).
    p: float = 0.75  # probability that an optimiser step trains under an attack
    attacks: tuple[str, ...] = ("ablate", "actadd", "expert-mask")  # drawn uniformly among those the model supports
    layer_fraction: float = 0.5  # share of layers ablated in an ablate step
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # actadd: multiples of the difference in means, drawn per step
    refresh_steps: int = 10  # re-extract the direction from the model being trained every N steps
    expert_k: int = 2  # MoE: refusal experts masked in an expert-mask step
    seed: int = 0
    method: str = "random"
    # --robust-method lat (training.lat): per-token L2 bound relative to the residual norm, ascent steps,
    # share of the last layers perturbed; p above is then the share of steps trained under PGD.
    lat_epsilon: float = 0.5
    lat_steps: int = 4
    lat_layer_fraction: float = 1.0
    # --robust-method adaptive (training.retuned_attacker): the utility budget the re-tuned actadd is held
    # to (harmless KL, nats per token: the matrix's budgeted attacker's), the places kept per refresh,
    # and the rows per side each re-tuning reads (its cost).
    kl_budget: float = 0.1
    tune_top: int = 3
    tune_prompts: int = 16
    tune_ablation: bool = True  # adaptive: re-select the ablated direction too (at every layer, within the budget)
    # Any method (training.early_tokens): the first K completion tokens of the harmful rows weigh
    # ``early_weight`` x their mean loss more, so refusal is decided deeper than its opening (0: off).
    early_tokens: int = 0
    early_weight: float = 1.0
    # Mount ablate / actadd on the slice's harmful rows only, the retain rows training unattacked (as
    # ReFAT and LAT do): a model trained to answer harmless prompts unchanged under a push would
    # widen the room a utility-budgeted attacker has. Expert masks act on the whole batch.
    harmful_rows_only: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"--robust-p must be in [0, 1], got {self.p}")
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"--robust-layer-fraction must be in (0, 1], got {self.layer_fraction}")
        if not self.coefficients or any(not c > 0 for c in self.coefficients):
            raise ValueError(f"--robust-coefficients must be positive numbers, got {self.coefficients}")
        if self.refresh_steps < 1:
            raise ValueError(f"--robust-refresh-steps must be at least 1, got {self.refresh_steps}")
        if self.early_tokens < 0 or self.early_weight < 0:
            raise ValueError("--robust-early-tokens and --robust-early-weight must not be negative")
        if not self.kl_budget > 0 or self.tune_top < 1 or self.tune_prompts < 1:
            raise ValueError("--robust-kl-budget must be positive, --robust-tune-top and --robust-tune-prompts at least 1")
        if self.method not in ROBUST_METHODS:
            raise ValueError(f"--robust-method must be one of {', '.join(ROBUST_METHODS)}, got {self.method!r}")
        bad = sorted(set(self.attacks) - set(ROBUST_ATTACKS))
        if bad or not self.attacks:
            raise ValueError(f"--robust-attacks: {bad or 'none given'}; choose from {', '.join(ROBUST_ATTACKS)}")


@dataclass
class RobustState:
    """What attack-in-the-loop training did, for finetune.json."""

    steps: int = 0
    attacked: dict[str, int] = field(default_factory=dict)
    refreshes: int = 0
    direction_layer: int = 0
    direction_position: int = -1
    direction_norms: list[float] = field(default_factory=list)
    expert_keys: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # attacks asked for that this model cannot take, and why
    # Most hooks left on the model after a step's attack was closed, over all steps: 0. Counted
    # against the step's start, since the trainer keeps hooks of its own (inputs that require grad).
    hooks_left: int = 0
    # --robust-method adaptive: the places the re-tuned attacker kept at each refresh (layer, position,
    # α, KL, loss gain), and the actadd steps that found none within the budget (drawn at random instead).
    retuned: list[list[dict[str, float]]] = field(default_factory=list)
    actadd_untuned: int = 0


class AttackInTheLoop:
    """Mounts a sampled attack for one optimiser step at a time (driven by ``robust_callback``)."""

    def __init__(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], fmt: ThinkingFormat,
                 cfg: RobustConfig, direction_at: tuple[int, int] | None = None,
                 refusal_experts: Sequence[tuple[int, int]] | None = None,
                 tuner: RetunedActadd | None = None) -> None:
        if not harmful or not harmless:
            raise ValueError("--robust needs harmful prompts (the slice) and harmless ones (--retain) to take the "
                             f"refusal direction from; got {len(harmful)} harmful and {len(harmless)} harmless")
        self.lm, self.harmful, self.harmless, self.fmt, self.cfg = lm, list(harmful), list(harmless), fmt, cfg
        self.n_layers = len(find_decoder_layers(lm.model))
        layer, position = direction_at if direction_at is not None else (self.n_layers // 2, -1)
        self.state = RobustState(direction_layer=layer, direction_position=position)
        self.attacks = [a for a in cfg.attacks if a != "expert-mask" or refusal_experts]
        if "expert-mask" in cfg.attacks and not refusal_experts:
            self.state.skipped.append("expert-mask: needs a mixture-of-experts model and --robust-kit with its expert statistics")
        self.masked = [tuple(k) for k in (refusal_experts or [])][: cfg.expert_k]
        self.state.expert_keys = [(int(a), int(b)) for a, b in self.masked]
        self.rng = random.Random(cfg.seed)
        self.stack = ExitStack()
        self.vectors: torch.Tensor | None = None  # [layers, positions, hidden] of the model being trained
        if cfg.method == "adaptive" and tuner is None:
            raise ValueError("--robust-method adaptive needs the re-tuned attacker (training.retuned_attacker)")
        self.tuner = tuner
        self.places: list[Place] = []
        # The current batch's harmful rows, set around each loss computation (robust_setup.attack_rows).
        self.rows: torch.Tensor | None = None
        self.row_mask = (lambda: self.rows) if cfg.harmful_rows_only else None
        self.hooks_before_step: int | None = None

    def refresh(self) -> None:
        model = self.lm.model
        was_training = model.training
        model.eval()
        try:
            settings = DirectionSettings(n_positions=max(DirectionSettings().n_positions, -self.state.direction_position))
            direction = extract_refusal_direction(self.lm, self.harmful, self.harmless, self.fmt,
                                                  self.state.direction_layer, self.state.direction_position, settings)
        finally:
            model.train(was_training)
        assert direction.all_vectors is not None
        self.vectors = direction.all_vectors.detach().clone()
        self.direction = direction.vector.detach().clone()
        if self.tuner is not None:
            model.eval()
            try:
                self.places = self.tuner.retune(self.vectors)
            finally:
                model.train(was_training)
            self.state.retuned = self.tuner.history
        self.state.refreshes += 1
        self.state.direction_norms.append(round(float(self.direction.norm()), 6))

    def begin_step(self, step: int) -> None:
        self.end_step()
        if self.vectors is None or step % self.cfg.refresh_steps == 0:
            self.refresh()
        self.state.steps += 1
        self.hooks_before_step = hook_count(self.lm.model)
        if not self.attacks or self.rng.random() >= self.cfg.p:
            return
        kind = self.rng.choice(self.attacks)
        self.state.attacked[kind] = self.state.attacked.get(kind, 0) + 1
        assert self.vectors is not None
        if kind == "ablate" and self.tuner is not None and self.tuner.ablations:
            # The re-tuned ablation: one of the strongest within-budget directions, at every layer, as an attacker mounts it.
            place = self.rng.choice(self.tuner.ablations)
            vector = self.vectors[place.layer, place.position]
            self.stack.enter_context(ablate_direction(self.lm.model, vector, rows=self.row_mask))
        elif kind == "ablate":
            k = max(1, round(self.cfg.layer_fraction * self.n_layers))
            layers = self.rng.sample(range(self.n_layers), k)
            self.stack.enter_context(ablate_direction(self.lm.model, self.direction, layers, rows=self.row_mask))
        elif kind == "actadd" and self.places:
            place = self.rng.choice(self.places)
            vector = self.vectors[place.layer, place.position]
            self.stack.enter_context(add_vector(self.lm.model, vector, [place.layer], -place.alpha, rows=self.row_mask))
        elif kind == "actadd":
            self.state.actadd_untuned += self.tuner is not None
            layer = self.rng.randrange(self.n_layers)
            vector = self.vectors[layer, self.rng.randrange(self.vectors.shape[1])]
            if float(vector.norm()) == 0:
                vector = self.direction  # layer 0 at template tokens: one fixed embedding, no difference of its own
            self.stack.enter_context(add_vector(self.lm.model, vector, [layer], -self.rng.choice(self.cfg.coefficients),
                                                rows=self.row_mask))
        else:
            self.stack.enter_context(scale_expert_routing(self.lm.model, {key: 0.0 for key in self.masked}))

    def end_step(self) -> None:
        self.stack.close()
        self.stack = ExitStack()
        if self.hooks_before_step is not None:
            self.state.hooks_left = max(self.state.hooks_left, hook_count(self.lm.model) - self.hooks_before_step)
            self.hooks_before_step = None

    def close(self) -> None:
        self.end_step()


def robust_callback(loop: AttackInTheLoop) -> object:
    """The Trainer callback that drives ``loop`` (built here so that importing this module
    does not import transformers)."""
    from transformers import TrainerCallback

    class RobustTraining(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's callback signature
            loop.begin_step(int(state.global_step))

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            loop.end_step()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            loop.close()

    return RobustTraining()


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every module: zero on a model nothing is steering."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def summary(loop: AttackInTheLoop) -> dict[str, Any]:
    from dataclasses import asdict

    return {"config": asdict(loop.cfg), **asdict(loop.state)}
