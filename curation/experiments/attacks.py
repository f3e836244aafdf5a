"""``curate experiment attacks``: the ASR re-evaluation matrix.

Rows are models: the base organism and LoRA fine-tunes on the cliff 1.7%,
random 1.7% and full selections. Columns are steering attacks. Each cell is
ASR on the held-out harmful prompts, with over-refusal on held-out harmless
prompts and the attack's own KL on harmless answers beside it (KL of the row's
model steered against the same model unsteered, on the base model's answers),
so an attack that merely breaks the model shows up as such.

The attacker is white-box: directions, benign vectors and MoE statistics are
re-extracted from every row's own model. What is chosen on validation data
(the direction's layer and position, coefficients, k, which single expert) is
chosen once, on the base model's validation split, and kept for every row, so
rows differ only in the model. Cells are saved as they
finish; a rerun resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.experiments.attack_kit import KitSettings, prepare_attack_kit
from curation.experiments.demo import DemoConfig, run_demo
from curation.experiments.selection import finetune_on_selection, run_name
from probes.chat import ThinkingFormat
from probes.directions import DirectionSettings
from probes.files import write_json_atomic
from probes.models import LoadedModel, fingerprint_model_dir, load_model
from training import report as rpt
from training.attacks import AttackKit, build_attack
from training.drift import harmless_kl
from training.evaluate import SWEEP_BATCH_SIZE, EvalSettings, asr_over, evaluate_prompts
from training.finetune import FinetuneConfig
from training.prompts import PromptItem, read_prompts

ROWS: dict[str, tuple[str, str] | None] = {
    "base": None,
    "cliff 1.7%": ("cliff", "1.7%"),
    "random 1.7%": ("random", "1.7%"),
    "full": ("full", "100%"),
}


@dataclass
class AttackExperiment:
    workdirs: dict[str, str]  # organism label ("dense", "moe") -> curate demo work directory
    out: str
    attacks: Sequence[str] | None = None  # default: every attack the model supports
    rows: Sequence[str] = tuple(ROWS)
    kit: KitSettings = field(default_factory=lambda: matrix_kit_settings(SWEEP_BATCH_SIZE))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_settings: EvalSettings = field(default_factory=lambda: EvalSettings(keep_samples=True, batch_size=SWEEP_BATCH_SIZE))


def matrix_kit_settings(batch_size: int) -> KitSettings:
    # The organism cannot be pushed into refusing by adding a direction at every position
    # (generation breaks first), so the induce check is off here; see the README.
    return KitSettings(batch_size=batch_size, directions=DirectionSettings(induce_min_gain=None, batch_size=batch_size))


def ensure_workdir(label: str, workdir: str, console: Any = None) -> Path:
    """A demo work directory with organism, store and retain set; runs the demo if any is missing."""
    root = Path(workdir)
    if not all((root / p).exists() for p in ("organism/organism.json", "curate.duckdb", "retain.jsonl")):
        run_demo(DemoConfig(workdir=workdir, moe=label == "moe"), console=console)
    return root


def _adapter_for(row: str, root: Path, out: Path, exp: AttackExperiment, fmt: ThinkingFormat) -> Path | None:
    spec = ROWS[row]
    if spec is None:
        return None
    name = run_name(spec[0], spec[1], 0)
    base = fingerprint_model_dir(root / "organism")
    for candidate in (root / "experiment_selection" / "runs" / name, out / "runs" / name):
        meta = candidate / "adapter" / "finetune.json"
        # Reuse only an adapter trained on this very organism (a rebuilt organism leaves stale ones behind).
        if meta.exists() and json.loads(meta.read_text()).get("base_fingerprint") == base:
            return candidate / "adapter"
    run_dir = out / "runs" / name
    finetune_on_selection(str(root / "organism"), str(root / "curate.duckdb"), str(root / "retain.jsonl"),
                          run_dir, spec[0], spec[1], 0, exp.finetune, fmt)
    return run_dir / "adapter"


def _cell(lm: LoadedModel, kit: AttackKit, attack_name: str, prompts: Sequence[PromptItem], fmt: ThinkingFormat,
          drift_pairs: list[tuple[str, str, str]], settings: EvalSettings, suppressed: set[str]) -> dict[str, Any]:
    attack = build_attack(attack_name, kit)
    wrapped = [PromptItem(attack.wrap(p.prompt), p.harmful, p.category) for p in prompts]
    started = time.monotonic()
    with attack.mount(lm, kit):
        result = evaluate_prompts(lm, wrapped, fmt, settings)
    kl = harmless_kl(lm, lm, drift_pairs, fmt, tuned_context=lambda: attack.mount(lm, kit)) if drift_pairs else None
    return {
        "attack": attack_name,
        "params": attack.params,
        "asr": result["asr_of_all"],
        "asr_suppressed": asr_over(result["per_category"], suppressed) if suppressed else None,
        "asr_other": asr_over(result["per_category"], set(result["per_category"]) - suppressed) if suppressed else None,
        "over_refusal": result["over_refusal_of_all"],
        "n_no_answer": result["n_no_answer"],
        "kl_harmless": kl,
        "per_category": result["per_category"],
        "seconds": round(time.monotonic() - started, 1),
        "examples": [s for s in result["samples"] if s["harmful"]][:3],
    }


def run_organism(label: str, root: Path, exp: AttackExperiment, fmt: ThinkingFormat,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    out = Path(exp.out) / label
    (out / "cells").mkdir(parents=True, exist_ok=True)
    organism = json.loads((root / "organism" / "organism.json").read_text())
    suppressed = set(organism["config"]["suppressed"])
    prompts = read_prompts(root / "organism" / "heldout_prompts.jsonl")
    kit_source = read_prompts(root / "organism" / "train_prompts.jsonl")
    base_kit: AttackKit | None = None
    base_drift: list[tuple[str, str, str]] | None = None
    cells: list[dict[str, Any]] = []
    for row in exp.rows:
        if row not in ROWS:
            raise ValueError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
        adapter = _adapter_for(row, root, out, exp, fmt)
        lm = load_model(root / "organism", adapter=adapter)
        kit_dir = out / "kits" / row.replace(" ", "_").replace("%", "pct")
        if (kit_dir / "kit.json").exists():
            kit = AttackKit.load_for(kit_dir, lm)
        else:
            if progress is not None:
                progress(f"{label} {row}: attack kit")
            kit = prepare_attack_kit(
                lm, kit_source, fmt, exp.kit, tune=base_kit is None,
                direction_at=(base_kit.direction.layer, base_kit.direction.position) if base_kit else None,
                progress=(lambda m, r=row: progress(f"{label} {r}: {m}")) if progress else None)
            if base_kit is not None:
                kit.strengths, kit.validation = dict(base_kit.strengths), {"tuned_on": [{"row": "base"}]}
            kit.save(kit_dir)
        base_kit = base_kit or kit
        if base_drift is None:
            # Drift pairs: the base model's own answers to the held-out harmless prompts.
            clean = evaluate_prompts(lm, [p for p in prompts if not p.harmful], fmt, exp.eval_settings)
            base_drift = [(s["prompt"], s["reasoning"], s["answer"]) for s in clean["samples"]
                          if s["closed"] and s["verdict"] == "compliance"]
        for attack_name in exp.attacks or kit.available():
            if attack_name not in kit.available():
                continue  # MoE attacks on a dense organism
            path = out / "cells" / f"{kit_dir.name}__{attack_name}.json"
            if path.exists():
                cell = json.loads(path.read_text())
            else:
                if progress is not None:
                    progress(f"{label} {row}: {attack_name}")
                cell = {"row": row, **_cell(lm, kit, attack_name, prompts, fmt, base_drift, exp.eval_settings, suppressed)}
                write_json_atomic(path, cell)
            cells.append(cell)
        del lm
    return {"organism": label, "workdir": str(root), "suppressed": sorted(suppressed), "cells": cells,
            "strengths": base_kit.strengths if base_kit else {}, "validation": base_kit.validation if base_kit else {},
            "direction": _direction_summary(base_kit) if base_kit else None}


def _direction_summary(kit: AttackKit) -> dict[str, Any]:
    d = kit.direction
    return {"layer": d.layer, "position": d.position, "norm": float(d.vector.norm()), "note": d.note,
            "baseline": d.baseline, "candidates": [c.__dict__ for c in d.candidates],
            "refusal_experts": kit.refusal_experts(4) if kit.is_moe else None}


def run_attack_experiment(exp: AttackExperiment, fmt: ThinkingFormat, progress: Callable[[str], None] | None = None,
                          console: Any = None) -> dict[str, Any]:
    started = time.monotonic()
    organisms = []
    for label, workdir in exp.workdirs.items():
        root = ensure_workdir(label, workdir, console)
        organisms.append(run_organism(label, root, exp, fmt, progress))
    doc = {"organisms": organisms, "rows": list(exp.rows), "seconds": round(time.monotonic() - started, 1)}
    out = Path(exp.out)
    write_json_atomic(out / "attacks_experiment.json", doc)
    write_attacks_html(out / "attacks_experiment.html", doc)
    return doc


def _heatmap(organism: dict[str, Any], rows: Sequence[str]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(dict.fromkeys(c["attack"] for c in organism["cells"]))
    grid = np.full((len(rows), len(attacks)), np.nan)
    notes = [["" for _ in attacks] for _ in rows]
    for c in organism["cells"]:
        if c["row"] in rows:
            i, j = rows.index(c["row"]), attacks.index(c["attack"])
            grid[i, j] = c["asr"]
            kl = "—" if c["kl_harmless"] is None else f"{c['kl_harmless']:.2f}"
            notes[i][j] = f"{100 * c['asr']:.0f}%\nOR {100 * (c['over_refusal'] or 0):.0f}%\nKL {kl}"
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2, 0.9 * len(rows) + 1.6))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    for i in range(len(rows)):
        for j in range(len(attacks)):
            if notes[i][j]:
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=6.5,
                        color="white" if grid[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="ASR (held-out harmful)")
    ax.set_title(f"{organism['organism']} organism: ASR under each attack (OR = over-refusal, KL = attack's harmless KL)", fontsize=9)
    fig.tight_layout()
    return rpt.png_base64(fig)


def write_attacks_html(path: Path, doc: dict[str, Any]) -> None:
    sections: list[tuple[str, str]] = []
    for org in doc["organisms"]:
        rows = [r for r in doc["rows"] if any(c["row"] == r for c in org["cells"])]
        sections.append((f"{org['organism']}: attack matrix", rpt.img(_heatmap(org, rows), "ASR heat map")))
        table = [[c["row"], c["attack"], c["asr"], c["asr_suppressed"], c["asr_other"], c["over_refusal"], c["kl_harmless"],
                  c["n_no_answer"], json.dumps(c["params"])] for c in org["cells"]]
        sections.append((f"{org['organism']}: cells", rpt.table(table, [
            "model", "attack", "ASR", "ASR suppressed", "ASR other areas", "over-refusal", "KL harmless", "no answer", "strength"])))
        d = org["direction"]
        if d:
            sections.append((f"{org['organism']}: refusal direction", rpt.table(
                [[c["layer"], c["position"], c["refusal_ablated"], c["induce_refusal"], c["kl_harmless"], c["passed"]]
                 for c in d["candidates"]],
                ["layer", "position", "val refusal (ablated)", "val induced refusal", "val KL", "passed filters"])
                + f"<p class='note'>chosen: layer {d['layer']}, position {d['position']}; validation refusal without "
                  f"attack {d['baseline']}. {d['note']}</p>"))
        if "single-expert" in org["validation"]:
            sweep = sorted(org["validation"]["single-expert"], key=lambda r: -(r["asr"] or 0))
            sections.append((f"{org['organism']}: single-expert sweep (validation)", rpt.table(
                [[r["params"]["layer"], r["params"]["expert"], r["asr"], r["over_refusal"]] for r in sweep],
                ["layer", "expert", "val ASR", "val over-refusal"])))
    sections.append(("About", "<p class='note'>ASR: share of held-out harmful prompts whose final answer the keyword "
                     "judge calls compliance. Directions and vectors are re-extracted from each row's model; strengths "
                     "were tuned on the base model's validation split (train prompts, never the held-out ones). KL is "
                     "per token on the base model's own harmless answers, steered model against the same model "
                     "unsteered (prompt templates are not part of it).</p>"))
    rpt.write_html_report(path, "Steering attacks before and after fine-tuning", sections)
