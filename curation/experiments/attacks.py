"""``curate experiment attacks``: the ASR re-evaluation matrix.

Rows are models: the base organism and LoRA fine-tunes on the cliff 1.7%,
random 1.7% and full selections, each plain and robust (attack-in-the-loop,
``training.robust``). Columns are steering attacks. Each cell is
ASR on the held-out harmful prompts, with over-refusal on held-out harmless
prompts and the attack's own KL on harmless answers beside it (KL of the row's
model steered against the same model unsteered, on the base model's answers),
so an attack that merely breaks the model shows up as such.

The attacker is white-box: directions, benign vectors and MoE statistics are
re-extracted from every row's own model. What is chosen on validation data
(the direction's layer and position, coefficients, k, which single expert) is
chosen once, on the base model's validation split, and kept for every row, so
rows differ only in the model: the *base-tuned* attacker. A defence measured
only against it proves little, so the *adaptive* attacker (``adaptive``
attacks) re-selects the direction's layer and position and re-tunes the
strength on each row's own validation prompts (train prompts, never the
held-out ones) before attacking it. It is unconstrained: it may push until the
model's language breaks. The *budgeted* adaptive attacker
(``"adaptive-budgeted"``, ``curation.experiments.budgeted_attacker``) searches
the same space within a utility budget (KL on harmless validation answers) and
counts only coherent compliance; its ``actadd`` cells carry the held-out
ASR-versus-α curve. Cells are saved as they finish; a rerun resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from curation.experiments.attack_cells import RowContext, adaptive_cells, adaptive_kit, base_tuned_cells, budgeted_cells
from curation.experiments.attack_kit import KitSettings, prepare_attack_kit
from curation.experiments.attack_report import write_attacks_html
from curation.experiments.attack_rows import ADAPTIVE_ATTACKS, ROWS
from curation.experiments.budgeted_attacker import BudgetSettings
from curation.experiments.demo import DemoConfig, run_demo
from curation.experiments.selection import finetune_on_selection, run_name
from curation.pipeline.generator_choice import attach_adapter, remote_generator
from probes.chat import ThinkingFormat
from probes.directions import DirectionSettings
from probes.files import write_json_atomic
from probes.models import fingerprint_model_dir, load_model, resolve_device, resolve_dtype
from training.attacks import AttackKit
from training.evaluate import SWEEP_BATCH_SIZE, EvalSettings, evaluate_prompts
from training.finetune import FinetuneConfig
from training.prompts import read_prompts
from training.robust import RobustConfig


@dataclass
class AttackExperiment:
    workdirs: dict[str, str]  # organism label ("dense", "moe") -> curate demo work directory
    out: str
    attacks: Sequence[str] | None = None  # default: every attack the model supports
    rows: Sequence[str] = tuple(ROWS)
    kit: KitSettings = field(default_factory=lambda: matrix_kit_settings(SWEEP_BATCH_SIZE))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    # Per organism, the setting curate experiment robust-sweep chose on its validation prompts (else ``robust``).
    robust_by_organism: dict[str, list[RobustConfig]] = field(default_factory=dict)
    adaptive: Sequence[str] = ADAPTIVE_ATTACKS
    # The budgeted adaptive attacker (None: not run). It re-uses the adaptive attacker's kit.
    budget: BudgetSettings | None = field(default_factory=BudgetSettings)
    # What generates the unsteered cells (and every unsteered generation of the kits): hf in-process, or
    # vllm: a server at generator_url, or one started per organism from make engine's environment.
    generator: str = "hf"
    generator_url: str | None = None
    generator_model: str | None = None
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


def _adapter_for(row: str, root: Path, out: Path, exp: AttackExperiment, fmt: ThinkingFormat, label: str) -> Path | None:
    spec = ROWS[row]
    if spec is None:
        return None
    strategy, budget, robust = spec
    method = robust if isinstance(robust, str) else "random"
    name = run_name(strategy, budget, 0) + (f"_robust-{method}" if isinstance(robust, str) else "_robust" if robust else "")
    base = fingerprint_model_dir(root / "organism")
    finetune, wanted = exp.finetune, None
    if robust:
        base_kit = out / "kits" / "base"
        if not (base_kit / "kit.json").exists():
            raise ValueError(f"row {row!r} trains against the base model's attack kit: put 'base' before it in --rows")
        # The sweep's choice for this organism where it swept this row's method, else the method's defaults.
        chosen = [c for c in exp.robust_by_organism.get(label, []) if c.method == method]
        default = exp.robust if method == "random" else RobustConfig(method=method)
        setting = chosen[-1] if chosen else default
        finetune = replace(exp.finetune, robust=setting, robust_kit=str(base_kit))
        wanted = json.loads(json.dumps(asdict(setting)))
    # The matrix's own adapter first: its kits and cells were made on it.
    for candidate in (out / "runs" / name, root / "experiment_selection" / "runs" / name):
        meta = candidate / "adapter" / "finetune.json"
        if not meta.exists():
            continue
        done = json.loads(meta.read_text())
        # Reuse only an adapter trained on this very organism (a rebuilt organism leaves stale ones
        # behind), and a robust one only with the same attack-in-the-loop settings.
        if done.get("base_fingerprint") == base and (done.get("robust") or {}).get("config") == wanted:
            return candidate / "adapter"
    run_dir = out / "runs" / name
    finetune_on_selection(str(root / "organism"), str(root / "curate.duckdb"), str(root / "retain.jsonl"),
                          run_dir, strategy, budget, 0, finetune, fmt)
    return run_dir / "adapter"


def run_organism(label: str, root: Path, exp: AttackExperiment, fmt: ThinkingFormat,
                 progress: Callable[[str], None] | None = None, generator: Any = None) -> dict[str, Any]:
    out = Path(exp.out) / label
    (out / "cells").mkdir(parents=True, exist_ok=True)
    organism = json.loads((root / "organism" / "organism.json").read_text())
    suppressed = set(organism["config"]["suppressed"])
    prompts = read_prompts(root / "organism" / "heldout_prompts.jsonl")
    kit_source = read_prompts(root / "organism" / "train_prompts.jsonl")
    base_kit: AttackKit | None = None
    base_drift: list[tuple[str, str, str]] | None = None
    cells: list[dict[str, Any]] = []
    generators: dict[str, Any] = {}  # row -> what generated its unsteered cells
    for row in exp.rows:
        if row not in ROWS:
            raise ValueError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
        adapter = _adapter_for(row, root, out, exp, fmt, label)
        lm = load_model(root / "organism", adapter=adapter)
        if generator is not None:
            lm.generator = generator
            generator.check(lm.tokenizer, lm.fingerprint)
            refused = attach_adapter(lm, (lambda m, r=row: progress(f"{label} {r}: {m}")) if progress else None)
            generators[row] = {"generator": "hf", "why": refused} if refused else generator.describe(lm.adapter)
        kit_dir = out / "kits" / row.replace(" ", "_").replace("%", "pct")
        _drop_if_stale(kit_dir, out / "cells", lm.fingerprint, progress, f"{label} {row}")
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
        ctx = RowContext(label, row, lm, out, kit_dir, prompts, kit_source, fmt, base_drift, exp.eval_settings, exp.kit,
                         suppressed, progress)
        cells += base_tuned_cells(ctx, kit, exp.attacks)
        own_kit = kit  # on the base row the base kit is tuned on that model's own validation prompts already
        if row != "base" and (exp.adaptive or exp.budget is not None):
            own_kit = adaptive_kit(ctx, exp.adaptive)
            cells += adaptive_cells(ctx, own_kit, exp.adaptive, exp.attacks)
        if exp.budget is not None:
            cells += budgeted_cells(ctx, own_kit, exp.budget, exp.attacks)
        del lm
    return {"organism": label, "workdir": str(root), "suppressed": sorted(suppressed), "cells": cells, "generators": generators,
            "strengths": base_kit.strengths if base_kit else {}, "validation": base_kit.validation if base_kit else {},
            "direction": _direction_summary(base_kit) if base_kit else None}


def _drop_if_stale(kit_dir: Path, cells_dir: Path, fingerprint: str, progress: Callable[[str], None] | None,
                   what: str) -> None:
    """A row whose model changed since its kit was made (its adapter was trained again, the organism
    rebuilt): the row's kits and finished cells are the matrix's own cache of another model, so they
    are removed and made again, never reused."""
    meta = kit_dir / "kit.json"
    if not meta.exists() or json.loads(meta.read_text()).get("model_fingerprint") == fingerprint:
        return
    if progress is not None:
        progress(f"{what}: its model changed since its kit was made; its kit and cells are made again")
    for folder in (kit_dir, *(kit_dir.with_name(kit_dir.name + suffix) for suffix in ("__adaptive", "__budgeted"))):
        if folder.exists():
            shutil.rmtree(folder)
    for cell in cells_dir.glob(f"{kit_dir.name}__*.json"):
        cell.unlink()


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
        if exp.generator == "hf":
            organisms.append(run_organism(label, root, exp, fmt, progress))
            continue
        if progress is not None:
            progress(f"{label}: vLLM server" + (f" at {exp.generator_url}" if exp.generator_url else " (starting)"))
        # fp32 on CPU, the loaded dtype elsewhere: the server generates what the local model would.
        dtype = resolve_dtype("auto", resolve_device("auto"))  # what load_model gives the matrix's rows
        with remote_generator(root / "organism", dtype, url=exp.generator_url, model=exp.generator_model,
                              lora_rank=exp.finetune.lora_r, log_path=Path(exp.out) / label / "vllm-server.log") as generator:
            organisms.append(run_organism(label, root, exp, fmt, progress, generator))
    doc = {"organisms": organisms, "rows": list(exp.rows), "seconds": round(time.monotonic() - started, 1)}
    out = Path(exp.out)
    write_json_atomic(out / "attacks_experiment.json", doc)
    write_attacks_html(out / "attacks_experiment.html", doc)
    return doc
