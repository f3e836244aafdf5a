"""Steering-attack verbs: prepare a kit, export an orthogonalized model, run the attack matrix."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from curation.cli.options import Option
from curation.cli.progress import stages
from curation.cli.verb import (
    DATA_OPTIONS,
    GENERATION_OPTIONS,
    JUDGE_OPTION,
    MARKER_OPTIONS,
    MODEL_OPTIONS,
    Output,
    Settings,
    Verb,
    at_least_one,
    check_input_file,
    comma_list,
    console,
    generation_cap,
    layout_from,
    load_model_from,
    out_console,
    single_judge,
    thinking_format,
)
from curation.experiments.attack_rows import ADAPTIVE_ATTACKS, ROWS
from curation.pipeline.generator_choice import GENERATOR_OPTIONS


def run_attacks_prepare(s: Settings) -> int:
    from curation.experiments.attack_kit import KitSettings, prepare_attack_kit
    from probes.directions import DirectionSettings
    from training.prompts import read_prompts

    lm = load_model_from(s, adapter=s["adapter"])
    prompts = s["prompts"] or str(Path(s["model"]) / "train_prompts.jsonl")
    settings = KitSettings(n_extract=s["n_extract"], n_val=s["n_val"], seed=s["seed"], max_new_tokens=generation_cap(s),
                           batch_size=s["batch_size"], judge=single_judge(s, "attacks prepare"),
                           directions=DirectionSettings(max_new_tokens=generation_cap(s), batch_size=s["batch_size"],
                                                        induce_min_gain=None if s["no_induce_check"] else 0.0))
    with stages("attack kit") as say:
        kit = prepare_attack_kit(lm, read_prompts(prompts, layout_from(s)), thinking_format(s), settings, progress=say)
    kit.save(s["out"])
    table = Table(title=f"attack kit for {lm.fingerprint} (strengths tuned on the validation split)")
    for col in ("attack", "chosen strength", "validation ASR"):
        table.add_column(col)
    for name, params in kit.strengths.items():
        best = next((r for r in kit.validation.get(name, []) if r.get("params") == params), {})
        table.add_row(name, json.dumps(params), "—" if best.get("asr") is None else f"{100 * best['asr']:.1f}%")
    out_console.print(table)
    d = kit.direction
    out_console.print(f"refusal direction: layer {d.layer}, position {d.position}. {d.note}")
    out_console.print(f"saved to {s['out']}")
    return 0


ATTACKS_PREPARE_VERB = Verb("attacks prepare", "extract the refusal direction, benign vectors and expert statistics; tune strengths", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory"),
        Option("--prompts", str, None, "jsonl with harmful and harmless prompts (default MODEL/train_prompts.jsonl); never the eval prompts"),
        Option("--out", str, None, "kit output directory", required=True),
        Option("--n-extract", int, 128, "prompts per side for the difference in means", minimum=1),
        Option("--n-val", int, 32, "prompts per side for direction selection and strength tuning", minimum=1),
        Option("--seed", int, 0, "seed for the extraction/validation split"),
        Option("--no-induce-check", None, False, "do not require the direction to induce refusal on harmless prompts"),
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
        Option("--batch-size", int, 16, "generation batch size", minimum=1),
] + MODEL_OPTIONS + DATA_OPTIONS, run_attacks_prepare,
    outputs=(Output("--out", folder=True),), inputs=("--model", "--adapter", "--prompts"))


def run_attacks_export(s: Settings) -> int:
    from probes.steering import orthogonalize_weights
    from training.attacks import AttackKit

    lm = load_model_from(s, adapter=s["adapter"])
    kit = AttackKit.load_for(s["attack_kit"], lm)
    orthogonalize_weights(lm.model, kit.direction.vector)
    out = Path(s["out"])
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    out_console.print(f"orthogonalized model (refusal direction from layer {kit.direction.layer}) saved to {out}")
    return 0


ATTACKS_EXPORT_VERB = Verb("attacks export", "save a copy of the model with the refusal direction orthogonalized out of its weights", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory (merged before editing)"),
        Option("--attack-kit", str, None, "attack kit for this model", required=True),
        Option("--out", str, None, "output model directory", required=True),
] + MODEL_OPTIONS, run_attacks_export,
    outputs=(Output("--out", folder=True),), inputs=("--model", "--adapter", "--attack-kit"))


def _cell_text(cells: dict, adaptive: dict, budgeted: dict, row: str, attack: str) -> str:
    """ASR under the base-tuned attacker (over-refusal) / under the adaptive attacker / under the budgeted one."""
    if (row, attack) not in cells:
        return "—"
    c = cells[row, attack]
    text = f"{100 * c['asr']:.0f}% ({100 * (c['over_refusal'] or 0):.0f}%)"
    if (row, attack) in adaptive and row != "base":
        text += f" / {100 * adaptive[row, attack]['asr']:.0f}%"
    elif (row, attack) in budgeted:
        text += " / ·"  # the base row: the adaptive attacker is the base-tuned one
    if (row, attack) in budgeted:
        text += f" / {100 * (budgeted[row, attack]['asr'] or 0):.0f}%"
    return text


def _chosen_settings(paths: str, organisms: list[str]) -> dict:
    """Each organism's robust settings as curate experiment robust-sweep chose them on validation
    prompts, one per swept method, from one or more (comma-separated) robust_sweep.json files."""
    from training.robust import RobustConfig

    chosen: dict[str, list[RobustConfig]] = {}
    for path in comma_list(paths):
        check_input_file(path, "--robust-from")
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        for org in doc.get("organisms", []):
            if org.get("organism") in organisms and org.get("chosen"):
                row = next(r for r in org["rows"] if r["setting"] == org["chosen"])
                cfg = RobustConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in row["robust"].items()})
                chosen.setdefault(org["organism"], []).append(cfg)
    missing = [o for o in organisms if o not in chosen]
    if missing:
        console.print(f"[yellow]warning:[/] --robust-from {paths}: no setting chosen for {', '.join(missing)}; "
                      "their robust rows use the defaults")
    return chosen


def run_experiment_attacks(s: Settings) -> int:
    from curation.experiments.attack_report import attacker_cells
    from curation.experiments.attacks import AttackExperiment, matrix_kit_settings, run_attack_experiment
    from curation.experiments.budgeted_attacker import BudgetSettings

    organisms = [o.strip() for o in s["organisms"].split(",") if o.strip()]
    bad = [o for o in organisms if o not in ("dense", "moe")]
    if bad or not organisms:
        raise ValueError(f"--organisms: choose from dense,moe (got {s['organisms']!r})")
    rows = [r.strip() for r in s["rows"].split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    attacks = [a.strip() for a in s["attacks"].split(",") if a.strip()] if s["attacks"] else None
    workdirs = {"dense": s["dense_workdir"], "moe": s["moe_workdir"]}
    batch_size = at_least_one(s, "batch_size")
    exp = AttackExperiment(workdirs={o: workdirs[o] for o in organisms}, out=s["out"], attacks=attacks, rows=rows,
                           kit=matrix_kit_settings(batch_size), adaptive=tuple(comma_list(s["adaptive"])),
                           budget=BudgetSettings(kl_budget=s["kl_budget"]) if s["kl_budget"] else None,
                           generator=s["generator"], generator_url=s["generator_url"], generator_model=s["generator_model"])
    if s["generator_url"] and s["generator"] != "vllm":
        raise ValueError("--generator-url is for --generator vllm")
    exp.eval_settings = replace(exp.eval_settings, batch_size=batch_size)
    if s["robust_from"]:
        exp.robust_by_organism = _chosen_settings(s["robust_from"], organisms)
    with stages("attack matrix") as say:
        doc = run_attack_experiment(exp, thinking_format(s), progress=say, console=out_console)
    for org in doc["organisms"]:
        names = list(dict.fromkeys(c["attack"] for c in org["cells"]))
        table = Table(title=f"{org['organism']} organism: ASR on held-out harmful prompts (over-refusal)")
        table.add_column("attack")
        for row in doc["rows"]:
            table.add_column(row, justify="right")
        cells = {(c["row"], c["attack"]): c for c in attacker_cells(org, "base-tuned")}
        adaptive = {(c["row"], c["attack"]): c for c in attacker_cells(org, "adaptive")}
        budgeted = {(c["row"], c["attack"]): c for c in org["cells"] if c.get("attacker") == "adaptive-budgeted"}
        for a in names:
            table.add_row(a, *[_cell_text(cells, adaptive, budgeted, r, a) for r in doc["rows"]])
        out_console.print(table)
        out_console.print("cells: ASR under the base-tuned attacker (over-refusal) / under the adaptive attacker / under the "
                          f"budgeted adaptive attacker (KL ≤ {exp.budget.kl_budget:g}, coherent compliance only)"
                          if exp.budget else "cells: ASR under the base-tuned attacker (over-refusal) / under the adaptive attacker",
                          highlight=False)
    out_console.print(f"{doc['seconds']:.0f} s; report: {Path(s['out']) / 'attacks_experiment.html'}")
    return 0


EXPERIMENT_ATTACKS_VERB = Verb("experiment attacks", "ASR matrix: base and fine-tuned models against every steering attack", [
        Option("--organisms", str, "dense,moe", "which organisms: dense, moe or both"),
        Option("--dense-workdir", str, "runs/demo", "demo work directory of the dense organism (made if missing)"),
        Option("--moe-workdir", str, "runs/demo-moe", "demo work directory of the MoE organism (made if missing)"),
        Option("--rows", str, ",".join(ROWS), "models to attack (robust rows need base first: its kit steers their training)"),
        Option("--adaptive", str, ",".join(ADAPTIVE_ATTACKS), "attacks the adaptive attacker re-tunes on each row's own "
               "validation prompts; empty: base-tuned attacker only"),
        Option("--kl-budget", float, 0.1, "the budgeted adaptive attacker's utility budget: harmless KL (nats per token) "
               "on validation answers, the same for every row; 0: no budgeted attacker", minimum=0.0),
        Option("--attacks", str, None, "comma-separated attacks (default: all the model supports)"),
        Option("--robust-from", str, None, "robust_sweep.json files (comma-separated, one per swept method) from curate "
               "experiment robust-sweep: each organism's robust rows train with the setting chosen for their method on "
               "validation prompts"),
        Option("--out", str, "runs/attacks", "output folder"),
        Option("--batch-size", int, 64, "generation batch size (evaluation, selection and tuning)", minimum=1),
        *GENERATOR_OPTIONS[:3],
] + MARKER_OPTIONS, run_experiment_attacks,
    outputs=(Output("--out", folder=True, appends=True),), inputs=("--robust-from",))


def _sweep_cell(c: dict | None) -> str:
    if c is None:
        return "—"
    text = f"{100 * (c['asr'] or 0):.0f}%"
    return text + (f" ({100 * c['over_refusal']:.0f}%)" if c.get("over_refusal") is not None else "")


def run_experiment_robust_sweep(s: Settings) -> int:
    from curation.experiments.attacks import matrix_kit_settings
    from curation.experiments.robust_sweep import RobustSweep, adaptive_grid, default_grid, lat_grid, run_robust_sweep

    organisms = comma_list(s["organisms"])
    if not organisms or any(o not in ("dense", "moe") for o in organisms):
        raise ValueError(f"--organisms: choose from dense,moe (got {s['organisms']!r})")
    workdirs = {"dense": s["dense_workdir"], "moe": s["moe_workdir"]}
    batch_size = at_least_one(s, "batch_size")
    grid = {"lat": lat_grid, "adaptive": adaptive_grid}.get(s["method"], default_grid)()
    sweep = RobustSweep(workdirs={o: workdirs[o] for o in organisms}, out=s["out"], kit=matrix_kit_settings(batch_size),
                        grid=grid)
    sweep.eval_settings = replace(sweep.eval_settings, batch_size=batch_size)
    with stages("robust sweep") as say:
        doc = run_robust_sweep(sweep, thinking_format(s), progress=say, console=out_console)
    for org in doc["organisms"]:
        table = Table(title=f"{org['organism']} organism, cliff 1.7%: validation ASR (over-refusal) by robust setting")
        table.add_column("setting")
        columns = list(dict.fromkeys(a for row in org["rows"] for a in row["cells"]))
        for a in columns:
            table.add_column(a, justify="right")
        for row in org["rows"]:
            mark = " (chosen)" if row["setting"] == org["chosen"] else ""
            table.add_row(row["setting"] + mark, *[_sweep_cell(row["cells"].get(a)) for a in columns])
        out_console.print(table)
    out_console.print(f"rule: {doc['rule']}; {doc['seconds']:.0f} s; {Path(s['out']) / 'robust_sweep.json'}", highlight=False)
    return 0


EXPERIMENT_ROBUST_SWEEP_VERB = Verb("experiment robust-sweep", "choose finetune --robust's settings on validation prompts "
                                    "(ASR under ablate and actadd by p, layer share, refresh interval)", [
        Option("--organisms", str, "dense,moe", "which organisms: dense, moe or both"),
        Option("--dense-workdir", str, "runs/demo", "demo work directory of the dense organism (made if missing)"),
        Option("--moe-workdir", str, "runs/demo-moe", "demo work directory of the MoE organism (made if missing)"),
        Option("--out", str, "runs/robust_sweep", "output folder"),
        Option("--method", str, "random", "which --robust-method's settings to sweep: random (p, layers, refresh), "
               "lat (epsilon, p) or adaptive (p, refresh)", choices=("random", "lat", "adaptive")),
        Option("--batch-size", int, 64, "generation batch size", minimum=1),
] + MARKER_OPTIONS, run_experiment_robust_sweep,
    outputs=(Output("--out", folder=True, appends=True),), inputs=())
