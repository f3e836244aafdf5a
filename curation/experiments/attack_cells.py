"""The attack matrix's cells for one row: each attacker's held-out evaluation, saved as it
finishes so that a rerun resumes (``curation.experiments.attacks`` walks the rows).

- base-tuned: the base model's kit, strengths and all, with this row's own vectors;
- ``adaptive``: direction and strengths chosen again on this row's own validation prompts,
  unconstrained;
- ``adaptive-budgeted``: the same search within a utility budget, counting coherent
  compliance only (``curation.experiments.budgeted_attacker``), with the held-out
  ASR-versus-α curve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from curation.experiments.attack_kit import KitSettings, prepare_attack_kit, split_source_prompts
from curation.experiments.attack_rows import ADAPTIVE_ATTACKS
from curation.experiments.budgeted_attacker import ATTACKER as BUDGETED
from curation.experiments.budgeted_attacker import BudgetSettings, coherent_asr, load_choice, save_choice, tune_budgeted
from probes.chat import ThinkingFormat
from probes.files import write_json_atomic
from probes.generate import remote_allowed
from probes.models import LoadedModel
from training.attacks import AttackKit, build_attack
from training.drift import harmless_kl
from training.evaluate import EvalSettings, asr_over, evaluate_prompts
from training.prompts import PromptItem


@dataclass(frozen=True)
class RowContext:
    """What every cell of one matrix row is measured with."""

    label: str  # organism
    row: str
    lm: LoadedModel
    out: Path  # the organism's output folder (cells/, kits/)
    kit_dir: Path  # this row's base-tuned kit
    prompts: Sequence[PromptItem]  # held-out
    kit_source: Sequence[PromptItem]  # train prompts: extraction and validation, never held-out
    fmt: ThinkingFormat
    drift: list[tuple[str, str, str]]  # the base model's own held-out harmless answers
    eval_settings: EvalSettings
    kit_settings: KitSettings
    suppressed: set[str]
    progress: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(f"{self.label} {self.row}: {message}")


def cell(ctx: RowContext, kit: AttackKit, attack_name: str, attacker: str = "base-tuned") -> dict[str, Any]:
    """One held-out cell: ASR (judged, and coherent only), over-refusal and the attack's own harmless KL."""
    lm = ctx.lm
    attack = build_attack(attack_name, kit)
    wrapped = [PromptItem(attack.wrap(p.prompt), p.harmful, p.category) for p in ctx.prompts]
    started = time.monotonic()
    with attack.mount(lm, kit):
        generator = "vllm" if remote_allowed(lm) else "hf"  # a hook keeps generation in-process
        result = evaluate_prompts(lm, wrapped, ctx.fmt, ctx.eval_settings)
    kl = harmless_kl(lm, lm, ctx.drift, ctx.fmt, tuned_context=lambda: attack.mount(lm, kit)) if ctx.drift else None
    suppressed = ctx.suppressed
    return {
        "attack": attack_name,
        "attacker": attacker,
        "generator": generator,
        "params": attack.params,
        "direction_at": [kit.direction.layer, kit.direction.position],
        "asr": result["asr_of_all"],
        # Compliance that closed its reasoning and is not degenerate (what the budgeted attacker counts).
        "asr_coherent": coherent_asr(result) if result["samples"] else None,
        "asr_suppressed": asr_over(result["per_category"], suppressed) if suppressed else None,
        "asr_other": asr_over(result["per_category"], set(result["per_category"]) - suppressed) if suppressed else None,
        "over_refusal": result["over_refusal_of_all"],
        "n_no_answer": result["n_no_answer"],
        "kl_harmless": kl,
        "per_category": result["per_category"],
        "seconds": round(time.monotonic() - started, 1),
        "examples": [s for s in result["samples"] if s["harmful"]][:3],
    }


def saved_cell(path: Path, ctx: RowContext, what: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A cell from its file when a run already finished it (the matrix resumes), else computed and saved."""
    if path.exists():
        return json.loads(path.read_text())
    ctx.say(what)
    result = {"row": ctx.row, **compute()}
    write_json_atomic(path, result)
    return result


def base_tuned_cells(ctx: RowContext, kit: AttackKit, attacks: Sequence[str] | None) -> list[dict[str, Any]]:
    return [saved_cell(ctx.out / "cells" / f"{ctx.kit_dir.name}__{name}.json", ctx, name,
                       lambda n=name: cell(ctx, kit, n))
            for name in (attacks or kit.available()) if name in kit.available()]  # MoE attacks skip a dense model


def adaptive_kit(ctx: RowContext, tune_only: Sequence[str]) -> AttackKit:
    """Direction and strengths chosen again on this row's own model and validation prompts (cached)."""
    adaptive_dir = ctx.kit_dir.with_name(ctx.kit_dir.name + "__adaptive")
    if (adaptive_dir / "kit.json").exists():
        return AttackKit.load_for(adaptive_dir, ctx.lm)
    ctx.say("adaptive attacker")
    kit = prepare_attack_kit(ctx.lm, ctx.kit_source, ctx.fmt, ctx.kit_settings, tune=True,
                             tune_only=list(tune_only or ADAPTIVE_ATTACKS), progress=ctx.say if ctx.progress else None)
    kit.save(adaptive_dir)
    return kit


def adaptive_cells(ctx: RowContext, kit: AttackKit, adaptive: Sequence[str], attacks: Sequence[str] | None) -> list[dict[str, Any]]:
    """The unconstrained adaptive attacker's held-out cells."""
    adaptive_dir = ctx.kit_dir.with_name(ctx.kit_dir.name + "__adaptive")
    return [saved_cell(ctx.out / "cells" / f"{adaptive_dir.name}__{name}.json", ctx, f"{name} (adaptive)",
                       lambda n=name: cell(ctx, kit, n, "adaptive"))
            for name in adaptive if name in kit.available() and (not attacks or name in attacks)]


def budgeted_cells(ctx: RowContext, kit: AttackKit, budget: BudgetSettings, attacks: Sequence[str] | None) -> list[dict[str, Any]]:
    """The budgeted adaptive attacker: its search on this row's validation prompts (cached with the
    model's fingerprint and the budget), then the held-out ``actadd`` and ``ablate`` cells at its
    choice, the ``actadd`` one with the held-out ASR-versus-α curve."""
    budget_dir = ctx.kit_dir.with_name(ctx.kit_dir.name + "__budgeted")
    choice = load_choice(budget_dir / "choice.json", ctx.lm.fingerprint)
    if choice is None or choice.get("budget") != json.loads(json.dumps(asdict(budget))):
        ctx.say(f"budgeted attacker (KL ≤ {budget.kl_budget:g} on harmless validation answers)")
        validation = split_source_prompts(ctx.kit_source, ctx.kit_settings).validation
        choice = tune_budgeted(ctx.lm, kit, validation, ctx.fmt, ctx.eval_settings, budget, ctx.kit_settings.steer_layers,
                               progress=ctx.say if ctx.progress else None)
        save_choice(budget_dir / "choice.json", choice, ctx.lm.fingerprint)
    cells = []
    for name in ("actadd", "ablate"):
        if attacks and name not in attacks:
            continue
        found = choice[name]
        path = ctx.out / "cells" / f"{budget_dir.name}__{name}.json"
        if found["params"] is None:  # nothing of this attack fits the budget: no success possible, said so
            cells.append(saved_cell(path, ctx, f"{name} (budgeted)", lambda n=name, f=found: {
                "attack": n, "attacker": BUDGETED, "params": None, "asr": 0.0, "asr_coherent": 0.0, "asr_judge": None,
                "kl_budget": budget.kl_budget, "kl_validation": None, "asr_validation": None, "note": f["note"],
                "direction_at": None, "over_refusal": None, "kl_harmless": None, "n_no_answer": None,
                "asr_suppressed": None, "asr_other": None, "per_category": {}, "examples": []}))
            continue
        tuned = replace(kit, strengths={**kit.strengths, name: found["params"]})
        cells.append(saved_cell(path, ctx, f"{name} (budgeted)",
                                lambda n=name, k=tuned, f=found: _budgeted_cell(ctx, k, n, f, budget)))
    return cells


def _budgeted_cell(ctx: RowContext, kit: AttackKit, name: str, found: dict[str, Any], budget: BudgetSettings) -> dict[str, Any]:
    result = cell(ctx, kit, name, BUDGETED)
    if name == "ablate":
        result["direction_at"] = [found["params"]["layer"], found["params"]["position"]]
    # Only coherent compliance counts as a success for this attacker; the judge's own figure stays beside it.
    result.update({"asr_judge": result["asr"], "asr": result["asr_coherent"], "kl_budget": budget.kl_budget,
                   "kl_validation": found["kl_validation"], "asr_validation": found["asr_validation"]})
    if name == "actadd":
        result["alpha_curve"] = alpha_curve(ctx, kit, budget)
    return result


def alpha_curve(ctx: RowContext, kit: AttackKit, budget: BudgetSettings) -> list[dict[str, Any]]:
    """Held-out ASR (coherent, and as judged), unfinished answers and harmless KL at each α of the
    budget's curve and at the budget's own α, at the budgeted attacker's place."""
    chosen = kit.strengths["actadd"]
    harmful = [p for p in ctx.prompts if p.harmful]
    points = []
    for alpha in sorted({*budget.curve_alphas, float(chosen["coefficient"])}):
        ctx.say(f"actadd (budgeted): α curve, α = {alpha:g}")
        attack = build_attack("actadd", kit, {**chosen, "coefficient": alpha})
        with attack.mount(ctx.lm, kit):
            r = evaluate_prompts(ctx.lm, harmful, ctx.fmt, ctx.eval_settings)
        kl = harmless_kl(ctx.lm, ctx.lm, ctx.drift, ctx.fmt, tuned_context=lambda a=attack: a.mount(ctx.lm, kit)) if ctx.drift else None
        points.append({"alpha": alpha, "asr": coherent_asr(r), "asr_judge": r["asr_of_all"], "n_no_answer": r["n_no_answer"],
                       "kl_harmless": kl, "budget_choice": alpha == float(chosen["coefficient"])})
    return points
