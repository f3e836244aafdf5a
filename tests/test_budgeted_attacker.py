"""The budgeted adaptive attacker and the re-tuned attacker of ``--robust-method adaptive``:
both stay within their harmless-KL budget, push as far as it allows (a tighter budget
never pushes further), count only coherent compliance, and leave no hook behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from curation.experiments.budgeted_attacker import (
    BudgetSettings,
    alpha_at_budget,
    coherent_compliance,
    own_answers,
    tune_budgeted,
)
from probes.directions import DirectionSettings, extract_refusal_direction
from probes.models import LoadedModel
from probes.steering import add_vector
from training.drift import harmless_kl
from training.evaluate import EvalSettings
from training.finetune import FinetuneConfig, finetune_lora
from training.kl_budget import SteeredKl, largest_alpha_within
from training.prompts import read_prompts
from training.retuned_attacker import RetunedActadd
from training.robust import RobustConfig, hook_count

from .conftest import FMT

EVAL = EvalSettings(max_new_tokens=96, batch_size=16)


@pytest.fixture(scope="module")
def direction_and_pairs(lm: LoadedModel, organism_dir: Path):
    prompts = read_prompts(organism_dir / "train_prompts.jsonl")
    harmful = [p.prompt for p in prompts if p.harmful][:24]
    harmless = [p.prompt for p in prompts if not p.harmful][:24]
    direction = extract_refusal_direction(lm, harmful, harmless, FMT, 1, -1, DirectionSettings(n_positions=2))
    pairs = own_answers(lm, [p for p in prompts if not p.harmful][24:32], FMT, EVAL)
    return direction, pairs, prompts


def test_the_budget_bounds_the_push_and_a_tighter_one_pushes_less(lm: LoadedModel, direction_and_pairs) -> None:
    direction, pairs, _ = direction_and_pairs
    vector = direction.at(1, -1)
    meter = SteeredKl(lm, pairs, FMT, batch_size=3)
    push = lambda a: lambda: add_vector(lm.model, vector, [1], -a)  # noqa: E731
    # The kept unsteered side gives the drift KL computed from scratch.
    assert meter(push(1.0)) == pytest.approx(harmless_kl(lm, lm, pairs, FMT, tuned_context=push(1.0)), rel=1e-4)
    loose, tight = BudgetSettings(kl_budget=0.1), BudgetSettings(kl_budget=0.01)
    a_loose, kl_loose = alpha_at_budget(meter, vector, 1, loose)
    a_tight, kl_tight = alpha_at_budget(meter, vector, 1, tight)
    assert 0 < a_tight <= a_loose and kl_tight <= 0.01 and kl_loose <= 0.1
    assert a_loose < loose.alpha_cap  # the organism breaks long before α 8: the search did the work
    # Just past the tolerance the push is over the budget: the attacker used what it was allowed.
    assert meter(push(a_loose * (1 + loose.tolerance) * 1.01)) > 0.1
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("curve", [lambda a: 0.02 * a * a, lambda a: 0.001 * a**3, lambda a: 0.05 * (math.exp(a) - 1),
                                   lambda a: 0.5 * a])
def test_the_alpha_search_lands_within_tolerance_of_the_crossing(curve) -> None:
    calls = []

    def kl_at(a: float) -> float:
        calls.append(a)
        return curve(a)

    alpha, kl = largest_alpha_within(kl_at, 0.1, 8.0, tolerance=0.05, max_tries=10)
    crossing = next(a / 1000 for a in range(8000, 0, -1) if curve(a / 1000) <= 0.1)
    assert kl == curve(alpha) <= 0.1 and crossing / 1.05 <= alpha <= crossing + 1e-3  # the grid above is 0.001 apart
    assert len(calls) <= 10


def test_the_alpha_search_edges() -> None:
    assert largest_alpha_within(lambda a: 0.0, 0.1, 8.0) == (8.0, 0.0)  # a push that does nothing: the cap
    assert largest_alpha_within(lambda a: 0.001 * a, 0.1, 8.0)[0] == 8.0  # within budget all the way
    assert largest_alpha_within(lambda a: 5.0, 0.1, 8.0) == (0.0, 0.0)  # over budget at any α


def test_only_coherent_compliance_counts() -> None:
    base = {"harmful": True, "closed": True, "verdict": "compliance", "answer": "Sure. Step one is to gather the parts."}
    assert coherent_compliance(base)
    assert not coherent_compliance({**base, "closed": False})
    assert not coherent_compliance({**base, "verdict": "refusal"})
    assert not coherent_compliance({**base, "answer": "the the the " * 20})
    assert not coherent_compliance({**base, "answer": "..."})
    assert not coherent_compliance({**base, "harmful": False})


def test_the_budgeted_search_keeps_every_choice_within_its_budget(lm: LoadedModel, direction_and_pairs) -> None:
    direction, _, prompts = direction_and_pairs
    from training.attacks import AttackKit

    kit = AttackKit(direction=direction, benign={}, model_fingerprint=lm.fingerprint)
    validation = [p for p in prompts if p.harmful][24:32] + [p for p in prompts if not p.harmful][24:32]
    budget = BudgetSettings(kl_budget=0.05, max_tries=4, alpha_fractions=(0.5, 1.0), ablate_candidates=1)
    found = tune_budgeted(lm, kit, validation, FMT, EVAL, budget, steer_layers=(1,))
    actadd = found["actadd"]
    assert actadd["params"]["layer"] == 1 and actadd["kl_validation"] <= 0.05
    assert all(p["kl"] <= 0.05 for p in actadd["places"]) and all(a["kl"] <= 0.05 for a in actadd["alphas"])
    assert actadd["params"]["coefficient"] in [a["alpha"] for a in actadd["alphas"]]
    ablate = found["ablate"]
    assert ablate["params"] is None or ablate["kl_validation"] <= 0.05
    assert found["budget"]["kl_budget"] == 0.05 and json.dumps(found)  # saved as JSON with the kit
    assert hook_count(lm.model) == 0


def test_the_retuned_attacker_finds_pushes_within_budget_that_raise_the_refusal_loss(
        lm: LoadedModel, organism_dir: Path, cliff_slice: Path, retain_file: Path) -> None:
    harmful = [(r["prompt"], r["reasoning"], r["answer"]) for r in map(json.loads, cliff_slice.read_text().splitlines())]
    harmless = [(r["prompt"], r["reasoning"], r["answer"]) for r in map(json.loads, retain_file.read_text().splitlines())]
    prompts = read_prompts(organism_dir / "train_prompts.jsonl")
    direction = extract_refusal_direction(lm, [p.prompt for p in prompts if p.harmful][:24],
                                          [p.prompt for p in prompts if not p.harmful][:24], FMT, 1, -1,
                                          DirectionSettings(n_positions=2))
    tuner = RetunedActadd(lm, harmful, harmless, FMT, kl_budget=0.1, top=2, max_prompts=8, tune_ablation=True)
    places = tuner.retune(direction.all_vectors)
    assert 1 <= len(places) <= 2 and tuner.history and len(tuner.history[0]) == len(places) + len(tuner.ablations)
    assert all(0 < p.alpha and p.kl <= 0.1 and p.attack == "actadd" for p in places)
    assert all(p.attack == "ablate" and p.kl <= 0.1 for p in tuner.ablations)
    assert places[0].loss_gain >= places[-1].loss_gain and places[0].loss_gain > 0  # the push hurts the refusal targets
    assert hook_count(lm.model) == 0


def test_adaptive_finetune_trains_against_the_retuned_attacker_and_leaves_a_plain_adapter(
        organism_dir: Path, cliff_slice: Path, retain_file: Path, tmp_path: Path) -> None:
    from training.robust import ROBUST_METHODS

    assert "adaptive" in ROBUST_METHODS
    # On the harmful rows only, with the early-token loss: the per-batch row masks must hold through the
    # backward pass (with gradient checkpointing on, its recompute saw other hooks and failed).
    cfg = FinetuneConfig(epochs=1, robust=RobustConfig(p=1.0, method="adaptive", attacks=("actadd", "ablate"), refresh_steps=3,
                                                       tune_prompts=4, tune_top=2, harmful_rows_only=True,
                                                       early_tokens=4))
    summary = finetune_lora(organism_dir, cliff_slice, tmp_path / "adaptive", cfg, FMT, retain_file=retain_file)
    info = summary["robust"]
    assert info["config"]["method"] == "adaptive" and info["hooks_left"] == 0 and summary["gradient_checkpointing"] is False
    assert info["early_tokens"]["steps"] > 0 and info["early_tokens"]["loss"]
    assert info["retuned"] and all(p["kl"] <= 0.1 for refresh in info["retuned"] for p in refresh)
    assert sum(info["attacked"].values()) == summary["steps"] and info["actadd_untuned"] == 0
    card = (tmp_path / "adaptive" / "README.md").read_text()
    assert "adaptive" in card
    from probes.models import load_model

    tuned = load_model(organism_dir, adapter=tmp_path / "adaptive")
    assert hook_count(tuned.model) == 0
