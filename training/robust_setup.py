"""How ``finetune --robust`` sets its trainer up for each method: the sampled attacks and the
re-tuned attacker (``training.robust``, ``training.retuned_attacker``), latent adversarial
training (``training.lat``) and the early-token loss (``training.early_tokens``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from probes.chat import ThinkingFormat, render_generation_prompt
from probes.models import LoadedModel
from training import robust
from training.robust import RobustConfig


def _harmful_prefixes(tokenizer: Any, harmful: list[str], fmt: ThinkingFormat) -> list[list[int]]:
    """The slice's harmful generation prompts as token ids: what marks a batch row as harmful."""
    return [tokenizer(render_generation_prompt(tokenizer, p, fmt), add_special_tokens=False).input_ids for p in harmful]


def deeper_refusal(trainer: Any, tokenizer: Any, harmful: list[str], fmt: ThinkingFormat, rc: RobustConfig) -> Any:
    """The early-token loss on the slice's harmful rows (training.early_tokens)."""
    from training.early_tokens import HarmfulRows, install

    return install(trainer, HarmfulRows(_harmful_prefixes(tokenizer, harmful, fmt)), rc.early_tokens, rc.early_weight)


def latent_adversary(trainer: Any, tokenizer: Any, harmful: list[str], fmt: ThinkingFormat, rc: RobustConfig) -> Any:
    """PGD on the residual stream inside every attacked step (training.lat), on the slice's harmful rows."""
    from training.lat import LatConfig, LatentAdversary, install

    lat = LatConfig(p=rc.p, epsilon=rc.lat_epsilon, steps=rc.lat_steps, layer_fraction=rc.lat_layer_fraction, seed=rc.seed)
    adversary = LatentAdversary(trainer.model, _harmful_prefixes(tokenizer, harmful, fmt), lat)
    install(trainer, adversary)
    return adversary


def attack_in_the_loop(lm: LoadedModel, model: torch.nn.Module, harmful: list[dict[str, str]],
                       harmless: list[dict[str, str]], fmt: ThinkingFormat, rc: RobustConfig,
                       robust_kit: str | None) -> robust.AttackInTheLoop:
    """The sampled attacks for --robust, on the model the trainer trains (the base with its adapter);
    with --robust-method adaptive, actadd re-tuned against it (training.retuned_attacker)."""
    from training.retuned_attacker import RetunedActadd

    training_lm = replace(lm, model=model)
    tuner = None
    if rc.method == "adaptive":
        rows = [[(p["prompt"], p["reasoning"], p["answer"]) for p in side] for side in (harmful, harmless)]
        tuner = RetunedActadd(training_lm, rows[0], rows[1], fmt, rc.kl_budget, top=rc.tune_top,
                              max_prompts=rc.tune_prompts, early_tokens=rc.early_tokens,
                              tune_ablation=rc.tune_ablation, seed=rc.seed)
    direction_at, experts = None, None
    if robust_kit:
        from training.attacks import AttackKit

        kit = AttackKit.load_for(robust_kit, lm)
        direction_at = (kit.direction.layer, kit.direction.position)
        experts = kit.refusal_experts(rc.expert_k) if kit.is_moe else None
    return robust.AttackInTheLoop(training_lm, [p["prompt"] for p in harmful], [p["prompt"] for p in harmless], fmt, rc,
                                  direction_at, experts, tuner)


def attack_rows(trainer: Any, loop: robust.AttackInTheLoop, tokenizer: Any, harmful: list[str], fmt: ThinkingFormat) -> None:
    """With --robust-harmful-rows-only: tell ``loop``'s attacks which rows of each batch are the
    slice's harmful ones, for the length of the loss computation (this trainer only)."""
    from training.early_tokens import HarmfulRows

    rows = HarmfulRows(_harmful_prefixes(tokenizer, harmful, fmt))
    original = trainer.compute_loss

    def compute_loss(model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        loop.rows = rows.mask(inputs["input_ids"])
        try:
            return original(model, inputs, *args, **kwargs)
        finally:
            loop.rows = None

    trainer.compute_loss = compute_loss
