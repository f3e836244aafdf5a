"""``curate demo``: the whole pipeline on the bundled model organism.

build organism -> candidate pool -> train probe -> score pool into DuckDB ->
select the top-MS slice -> LoRA fine-tune (slice + retain set) -> evaluate
held-out prompts before and after -> report.json / report.html.

The pipeline stages never see which risk areas the organism suppresses; that
ground truth is read back only to report how the selection fell.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from curation.experiments.demo_console import print_summary
from curation.experiments.demo_spread import compare_with_reference
from curation.pipeline.probe_job import ProbeTrainSettings, train_probe_for_model
from curation.pipeline.score import ScoreSettings, score_records
from curation.pipeline.select import export_selection
from curation.pipeline.sources import read_jsonl
from curation.pipeline.store import Store
from probes.chat import ThinkingFormat, build_completion
from probes.files import write_json_atomic
from probes.models import load_model
from training import report as rpt
from training.evaluate import EvalSettings, asr_over, evaluate_prompts
from training.finetune import FinetuneConfig, finetune_lora
from training.judge_record import agreement_table
from training.organism.build import OrganismConfig, build_organism, builder_version
from training.organism.corpus import DEFAULT_SUPPRESSED, safe_target
from training.organism.corpus import PromptItem as OrganismPrompt
from training.prompts import read_prompts
from training.retain import build_retain_set


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"
    size: str = "demo"
    moe: bool = False
    seed: int = 0
    suppressed: tuple[str, ...] = DEFAULT_SUPPRESSED
    budget: str = "1.7%"
    strategy: str = "cliff"
    retain_size: int = 64
    rebuild: bool = False
    # Judged answers cost a few tokens on the organism and let the selection
    # experiment run its rule-based baseline on the demo's store.
    score: ScoreSettings = field(default_factory=lambda: ScoreSettings(judge_answers=True))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


class _Stages:
    """Times each stage and shows progress for the ones that count items."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        started = time.monotonic()
        columns = [TextColumn(f"[bold]{name:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total)

            def advance(n: int = 1, new_total: int | None = None) -> None:
                if new_total is not None:
                    progress.update(task, total=new_total)
                progress.advance(task, n)

            yield advance
            final = progress.tasks[0].total or 1
            progress.update(task, completed=final, total=final)
        self.seconds[name] = round(time.monotonic() - started, 1)


def _organism(cfg: DemoConfig, root: Path, stages: _Stages) -> Path:
    org_dir = root / "organism"
    wanted = OrganismConfig(size=cfg.size, moe=cfg.moe, seed=cfg.seed, suppressed=tuple(cfg.suppressed))
    meta_file = org_dir / "organism.json"
    if meta_file.exists() and not cfg.rebuild:
        meta = json.loads(meta_file.read_text())
        built = meta["config"]
        if meta.get("builder_version") == builder_version() and {k: built.get(k) for k in ("size", "moe", "seed", "suppressed")} == {
            "size": wanted.size, "moe": wanted.moe, "seed": wanted.seed, "suppressed": list(wanted.suppressed)
        }:
            stages.console.print(f"reusing organism at {org_dir} (--rebuild to build it again)")
            return org_dir
    with stages.stage("build organism") as advance:
        build_organism(org_dir, wanted, progress=lambda _step, n, _loss: advance(1, new_total=n))
    return org_dir


def write_candidate_pool(org_dir: Path, out: Path, seed: int, fmt: ThinkingFormat) -> int:
    """The organism's training-side harmful prompts, each paired with a safe
    target (reasoning that names the harm, then a refusal)."""
    rng = random.Random(seed)
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for item in read_prompts(org_dir / "train_prompts.jsonl"):
            if not item.harmful:
                continue
            reasoning, answer = safe_target(OrganismPrompt(item.prompt, item.category or ""), rng)
            fh.write(json.dumps({"prompt": item.prompt, "response": build_completion(reasoning, answer, fmt),
                                 "category": item.category, "source": "organism-train"}) + "\n")
            n += 1
    return n


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    fmt = ThinkingFormat()
    stages = _Stages(console)
    started = time.monotonic()

    org_dir = _organism(cfg, root, stages)
    organism_meta = json.loads((org_dir / "organism.json").read_text())
    suppressed = set(organism_meta["config"]["suppressed"])
    lm = load_model(org_dir)
    train_prompts = read_prompts(org_dir / "train_prompts.jsonl")
    heldout = read_prompts(org_dir / "heldout_prompts.jsonl")

    candidates = root / "candidates.jsonl"
    n_pool_written = write_candidate_pool(org_dir, candidates, cfg.seed, fmt)

    probe_dir = root / "probe"
    with stages.stage("train probe", total=len(train_prompts)) as advance:
        probe, probe_report = train_probe_for_model(lm, train_prompts, fmt, ProbeTrainSettings(seed=cfg.seed), progress=advance)
    probe.save(probe_dir)

    db = root / "curate.duckdb"
    read = read_jsonl(candidates)
    with Store(db) as store, stages.stage("score pool", total=len(read.records)) as advance:
        store.add_quarantine(read.quarantined, None)
        summary = score_records(lm, probe, store, read.records, fmt, cfg.score, progress=advance)

    selection = root / "selection.jsonl"
    with Store(db) as store, stages.stage("select", total=1):
        manifest = export_selection(store, selection, strategy=cfg.strategy, budget_text=cfg.budget, seed=cfg.seed,
                                    fmt=fmt, model_fingerprint=lm.fingerprint, probe_id=probe.probe_id)
        traces = store.traces(lm.fingerprint, probe.probe_id)
    selected_categories = [c for i, c, _, _ in traces if i in set(manifest.ids)]

    retain = root / "retain.jsonl"
    rng = random.Random(cfg.seed)
    harmless_train = [p for p in train_prompts if not p.harmful]
    rng.shuffle(harmless_train)
    with stages.stage("retain set", total=1):
        n_retain = build_retain_set(lm, harmless_train[: cfg.retain_size], retain, fmt).written

    with stages.stage("evaluate before", total=len(heldout)) as advance:
        before = evaluate_prompts(lm, heldout, fmt, EvalSettings(), progress=advance)
    write_json_atomic(root / "eval_before.json", before)
    del lm

    adapter = root / "adapter"
    with stages.stage("LoRA fine-tune", total=1):
        ft_summary = finetune_lora(org_dir, selection, adapter, cfg.finetune, fmt, retain_file=retain)

    tuned = load_model(org_dir, adapter=adapter)
    with stages.stage("evaluate after", total=len(heldout)) as advance:
        after = evaluate_prompts(tuned, heldout, fmt, EvalSettings(), progress=advance)
    write_json_atomic(root / "eval_after.json", after)

    result = _assemble_report(cfg, root, organism_meta, suppressed, probe, probe_report, summary, manifest,
                              selected_categories, n_pool_written, n_retain, ft_summary, before, after,
                              stages.seconds, time.monotonic() - started)
    _write_html(root, result, traces, set(manifest.ids), _explorer(root, manifest, tuned, fmt))
    print_summary(console, result)
    return result


def _assemble_report(cfg, root, organism_meta, suppressed, probe, probe_report, summary, manifest,
                     selected_categories, n_pool_written, n_retain, ft_summary, before, after, seconds, total) -> dict[str, Any]:
    harmful_cats = {c for c in before["per_category"]}
    from_suppressed = sum(1 for c in selected_categories if c in suppressed)
    result: dict[str, Any] = {
        "note": "Numbers from the bundled model organism; they say the pipeline works, not how a real model behaves.",
        "selection": {
            "strategy": manifest.strategy,
            "budget": manifest.budget,
            "n_pool": manifest.n_pool,
            "n_selected": manifest.n_selected,
            "share_from_suppressed": from_suppressed / max(1, manifest.n_selected),
            "pool_share_suppressed": None,
            "selected_categories": {c: selected_categories.count(c) for c in sorted(set(selected_categories), key=str)},
        },
        "asr": {"before": asr_over(before["per_category"], suppressed), "after": asr_over(after["per_category"], suppressed)},
        "asr_all": {"before": before["asr_of_all"], "after": after["asr_of_all"]},
        "asr_other_areas": {
            "before": asr_over(before["per_category"], harmful_cats - suppressed),
            "after": asr_over(after["per_category"], harmful_cats - suppressed),
        },
        "over_refusal": {"before": before["over_refusal_of_all"], "after": after["over_refusal_of_all"]},
        "n_heldout": {"harmful": before["n_harmful"], "harmless": before["n_harmless"]},
        # Every stage's judge (probe labels, answer verdicts, retain set, evaluation): the default one.
        "judge": {"name": before["judge"], "settings": before["judge_settings"],
                  "held_out_agreement": before.get("judge_agreement")},
        "per_category": {"before": before["per_category"], "after": after["per_category"]},
        "probe": {"probe_id": probe.probe_id, "layer": probe.layer, "n_positive": probe_report.n_positive,
                  "n_negative": probe_report.n_negative, "sweep": [asdict(r) for r in probe.meta.sweep]},
        "scoring": asdict(summary),
        "finetune": {k: ft_summary[k] for k in ("n_safety_examples", "n_examples", "train_loss", "steps", "seconds")}
        | {"n_retain": n_retain},
        "organism": {k: organism_meta[k] for k in ("architecture", "parameters", "build_seconds", "config")},
        "seconds": seconds | {"total": round(total, 1)},
        "paths": {
            "model": str(root / "organism"),
            "probe": str(root / "probe"),
            "adapter": str(root / "adapter"),
            "db": str(root / "curate.duckdb"),
            "selection": str(root / "selection.jsonl"),
            "selection_manifest": str(root / "selection.jsonl.manifest.json"),
            "candidates": str(root / "candidates.jsonl"),
            "retain": str(root / "retain.jsonl"),
            "eval_before": str(root / "eval_before.json"),
            "eval_after": str(root / "eval_after.json"),
            "report_html": str(root / "report.html"),
            "cliff_plot": str(root / "cliff.png"),
        },
    }
    with Store(root / "curate.duckdb", read_only=True) as store:
        result["selection"]["pool_share_suppressed"] = store.category_share(
            manifest.model_fingerprint, manifest.probe_id, sorted(suppressed)
        )
    default = DemoConfig()
    # The seeds' reference spread is measured on the default demo only.
    result["reference_spread"] = compare_with_reference(result) if (
        cfg.size, cfg.moe, cfg.budget, cfg.strategy, tuple(cfg.suppressed)) == (
        default.size, default.moe, default.budget, default.strategy, tuple(default.suppressed)) else None
    write_json_atomic(root / "report.json", result)
    return result


def _explorer(root: Path, manifest: Any, lm: Any, fmt: ThinkingFormat) -> str:
    from curation.experiments.explorer import explorer_data, explorer_section

    with Store(root / "curate.duckdb", read_only=True) as store:
        return explorer_section(explorer_data(store, manifest.model_fingerprint, manifest.probe_id, set(manifest.ids),
                                              lm.tokenizer, fmt, lm.end_tokens, settings_sha256=manifest.generation_settings))


def _write_html(root: Path, result: dict[str, Any], traces, highlight: set[str], explorer: str) -> None:
    cliff_png = rpt.plot_cliff_traces(traces, highlight, path=root / "cliff.png")
    ms_png = rpt.plot_misalignment_by_category(traces)
    asr_png = rpt.plot_asr({
        "ASR suppressed": (result["asr"]["before"], result["asr"]["after"]),
        "ASR all harmful": (result["asr_all"]["before"], result["asr_all"]["after"]),
        "over-refusal": (result["over_refusal"]["before"], result["over_refusal"]["after"]),
    })
    sel = result["selection"]
    sections = [
        ("About these numbers", f"<p class='note'>{result['note']}</p>"),
        ("The refusal cliff", rpt.img(cliff_png, "refusal score traces") + rpt.img(ms_png, "MS by category")),
        ("Selection", rpt.table(
            [[sel["strategy"], sel["budget"], sel["n_pool"], sel["n_selected"], sel["share_from_suppressed"], sel["pool_share_suppressed"]]],
            ["strategy", "budget", "pool", "selected", "share from suppressed areas", "suppressed share of pool"])
         + rpt.table(sorted(sel["selected_categories"].items()), ["category", "selected"])),
        ("Before and after the fine-tune", rpt.img(asr_png, "ASR before and after") + rpt.table(
            [[name, result[key]["before"], result[key]["after"]] for name, key in
             (("ASR, suppressed areas", "asr"), ("ASR, all harmful", "asr_all"), ("ASR, other areas", "asr_other_areas"),
              ("over-refusal, harmless", "over_refusal"))],
            ["metric (held-out prompts)", "before", "after"])),
        ("Examples: why each row was selected", explorer),
        ("Judge", rpt.table(*agreement_table(result["judge"]["name"], result["judge"].get("held_out_agreement")))),
        ("Probe layer sweep", rpt.table(
            [[r["layer"], r["heldout_accuracy"], r["heldout_auroc"], r["span_gap"], r["C"]] for r in result["probe"]["sweep"]],
            ["layer", "held-out accuracy", "held-out AUROC", "span gap", "C"]) + f"<p>kept layer {result['probe']['layer']}</p>"),
        ("Artifacts", rpt.table(sorted(result["paths"].items()), ["artifact", "path"])),
        ("Stage times (s)", rpt.table(rpt.stage_times_in_order(result["seconds"]), ["stage", "seconds"])),
    ]
    rpt.write_html_report(root / "report.html", "cliff-curate demo report", sections)
