"""``curate experiment selection``: Cliff-as-a-Judge against baselines.

Every (strategy, budget, seed) run selects from the same scored pool, is
fine-tuned with the same settings and the same retain set, and is evaluated on
the same held-out prompts, so the only difference between rows is which
examples were chosen. Runs already finished in the output folder are reused,
so a long sweep can be stopped and resumed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curation.pipeline.select import SelectionManifest, export_selection
from curation.pipeline.store import Store
from probes.chat import ThinkingFormat
from probes.files import write_json_atomic
from probes.models import load_model
from training import report as rpt
from training.drift import harmless_kl
from training.evaluate import SWEEP_BATCH_SIZE, EvalSettings, asr_over, evaluate_prompts
from training.finetune import FinetuneConfig, finetune_lora
from training.prompts import read_prompts

DEFAULT_BUDGETS = ("0.5%", "1.7%", "5%")
DEFAULT_STRATEGIES = ("cliff", "random", "low-final", "plateau", "rule")


@dataclass
class SelectionExperiment:
    model: str
    db: str
    retain: str | None
    eval_prompts: str
    out: str
    budgets: Sequence[str] = DEFAULT_BUDGETS
    strategies: Sequence[str] = DEFAULT_STRATEGIES
    random_seeds: int = 3
    include_full: bool = True
    suppressed: Sequence[str] = ()  # ground-truth weak areas, for reporting only (the organism's)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_settings: EvalSettings = field(default_factory=lambda: EvalSettings(keep_samples=True, batch_size=SWEEP_BATCH_SIZE))


def _plan(exp: SelectionExperiment) -> list[tuple[str, str, int]]:
    runs = []
    for budget in exp.budgets:
        for strategy in exp.strategies:
            seeds = range(exp.random_seeds) if strategy in ("random", "rule") else range(1)
            runs.extend((strategy, budget, seed) for seed in seeds)
    if exp.include_full:
        runs.append(("full", "100%", 0))
    return runs


def _metrics(result: dict[str, Any], suppressed: set[str]) -> dict[str, Any]:
    return {
        "asr_suppressed": asr_over(result["per_category"], suppressed) if suppressed else None,
        "asr_all": result["asr_of_all"],
        "over_refusal": result["over_refusal_of_all"],
        "n_no_answer": result["n_no_answer"],
    }


def run_name(strategy: str, budget: str, seed: int) -> str:
    return f"{strategy}_{budget.replace('%', 'pct')}_s{seed}"


def finetune_on_selection(
    model: str, db: str, retain: str | None, run_dir: Path, strategy: str, budget: str, seed: int,
    finetune: FinetuneConfig, fmt: ThinkingFormat,
) -> tuple[SelectionManifest, dict[str, str | None]]:
    """Select (strategy, budget, seed) from the store and LoRA-tune ``model`` on it
    into ``run_dir/adapter``; returns the selection manifest and the chosen rows' categories."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with Store(db, read_only=True) as store:
        manifest = export_selection(store, run_dir / "selection.jsonl", strategy=strategy, budget_text=budget,
                                    seed=seed, fmt=fmt)
        cats = store.categories(manifest.ids)
    finetune_lora(model, run_dir / "selection.jsonl", run_dir / "adapter", finetune, fmt, retain_file=retain)
    return manifest, cats


def run_selection_experiment(
    exp: SelectionExperiment,
    fmt: ThinkingFormat,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    out = Path(exp.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    suppressed = set(exp.suppressed)
    prompts = read_prompts(exp.eval_prompts)
    base = load_model(exp.model)
    base_eval = evaluate_prompts(base, prompts, fmt, exp.eval_settings)
    # Drift is measured on the base model's own answers to the held-out harmless prompts.
    drift_pairs = [
        (s["prompt"], s["reasoning"], s["answer"])
        for s in base_eval["samples"]
        if not s["harmful"] and s["closed"] and s["verdict"] == "compliance"
    ]
    rows: list[dict[str, Any]] = [{"strategy": "base", "budget": "0", "seed": 0, "n_selected": 0,
                                   "share_suppressed": None, "kl_harmless": 0.0, **_metrics(base_eval, suppressed)}]
    for strategy, budget, seed in _plan(exp):
        name = run_name(strategy, budget, seed)
        run_dir = out / "runs" / name
        done = run_dir / "result.json"
        if done.exists():
            previous = json.loads(done.read_text())
            # A run is reused only if it was made from this very base model.
            if previous.get("base_fingerprint") == base.fingerprint:
                rows.append(previous)
                continue
        if progress is not None:
            progress(name)
        manifest, cats = finetune_on_selection(exp.model, exp.db, exp.retain, run_dir, strategy, budget, seed,
                                               exp.finetune, fmt)
        tuned = load_model(exp.model, adapter=run_dir / "adapter")
        result = evaluate_prompts(tuned, prompts, fmt, exp.eval_settings)
        row = {
            "strategy": strategy,
            "budget": budget,
            "seed": seed,
            "base_fingerprint": base.fingerprint,
            "n_selected": manifest.n_selected,
            "share_suppressed": (sum(1 for i in manifest.ids if cats.get(i) in suppressed) / max(1, manifest.n_selected))
            if suppressed else None,
            "kl_harmless": harmless_kl(base, tuned, drift_pairs, fmt) if drift_pairs else None,
            **_metrics(result, suppressed),
        }
        write_json_atomic(done, row)
        rows.append(row)
        del tuned
    summary = _summarise(rows)
    result_doc = {"experiment": {k: v for k, v in asdict(exp).items() if k not in ("eval_settings",)},
                  "rows": rows, "summary": summary}
    write_json_atomic(out / "selection_experiment.json", result_doc)
    _write_html(out, result_doc, bool(suppressed))
    return result_doc


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread per (strategy, budget); random and rule have several seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    summary = []
    for (strategy, budget), group in groups.items():
        entry: dict[str, Any] = {"strategy": strategy, "budget": budget, "n_runs": len(group),
                                 "n_selected": group[0]["n_selected"]}
        for key in ("asr_suppressed", "asr_all", "over_refusal", "kl_harmless", "share_suppressed"):
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def _budget_value(budget: str) -> float:
    return float(budget.rstrip("%")) if budget.endswith("%") else float("nan")


def _write_html(out: Path, doc: dict[str, Any], has_suppressed: bool) -> None:
    import matplotlib.pyplot as plt

    metric = "asr_suppressed" if has_suppressed else "asr_all"
    fig, ax = plt.subplots(figsize=(7, 4))
    summary = doc["summary"]
    for strategy in sorted({s["strategy"] for s in summary} - {"base", "full"}):
        pts = sorted((_budget_value(s["budget"]), s[metric], s[metric + "_sd"] or 0.0)
                     for s in summary if s["strategy"] == strategy and s[metric] is not None)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=strategy)
    for name, style in (("full", "--"), ("base", ":")):
        ref = [s for s in summary if s["strategy"] == name and s[metric] is not None]
        if ref:
            ax.axhline(ref[0][metric], linestyle=style, color="black", label=f"{name} ({ref[0][metric]:.2f})")
    ax.set_xscale("log")
    budgets = sorted({_budget_value(s["budget"]) for s in summary if s["strategy"] not in ("base", "full")})
    ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget (% of the pool, log scale)")
    ax.set_ylabel("ASR, suppressed areas" if has_suppressed else "ASR, all harmful")
    ax.set_title("ASR after fine-tuning on each selection")
    ax.legend(fontsize=8)
    plot = rpt.png_base64(fig)
    header = ["strategy", "budget", "runs", "selected", "ASR suppressed", "± sd", "ASR all", "over-refusal", "KL harmless", "share suppressed"]
    rows = [[s["strategy"], s["budget"], s["n_runs"], s["n_selected"], s["asr_suppressed"], s["asr_suppressed_sd"], s["asr_all"],
             s["over_refusal"], s["kl_harmless"], s["share_suppressed"]] for s in summary]
    rpt.write_html_report(out / "selection_experiment.html", "Cliff-as-a-Judge against baselines", [
        ("ASR against budget", rpt.img(plot, "ASR against budget per strategy")),
        ("Summary (mean over seeds)", rpt.table(rows, header)),
        ("About", "<p class='note'>Same pool, fine-tune settings, retain set and held-out prompts for every row; "
                  "KL harmless is the mean per-token KL(base ‖ tuned) on the base model's own answers to held-out "
                  "harmless prompts.</p>"),
    ])


def from_workdir(workdir: str | Path, **overrides: Any) -> SelectionExperiment:
    """An experiment over a ``curate demo`` work directory's artifacts."""
    root = Path(workdir)
    organism = json.loads((root / "organism" / "organism.json").read_text())
    missing = [p for p in ("organism", "curate.duckdb", "retain.jsonl") if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}: run curate demo --workdir {root} first")
    return SelectionExperiment(
        model=str(root / "organism"),
        db=str(root / "curate.duckdb"),
        retain=str(root / "retain.jsonl"),
        eval_prompts=str(root / "organism" / "heldout_prompts.jsonl"),
        out=str(root / "experiment_selection"),
        suppressed=tuple(organism["config"]["suppressed"]),
        **overrides,
    )

