"""The ``curate`` command: parse, resolve layered settings, call, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from curation.config import Option, add_options, load_config_file, resolve
from curation.select import STRATEGIES
from training.attack_names import ATTACKS as ATTACK_CHOICES

console = Console(stderr=True)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value

out_console = Console()

_MARKERS = [
    Option("--think-open", str, "<think>", "marker that opens the reasoning"),
    Option("--think-close", str, "</think>", "marker that closes the reasoning"),
]
_MODEL = [
    Option("--device", str, "auto", "cpu, cuda, cuda:1 or auto"),
    Option("--dtype", str, "auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"),
    Option("--trust-remote-code", None, False, "allow a checkpoint's own Python code to run (off unless asked)"),
    *_MARKERS,
    Option("--chat-template-kwargs", _json_object, None, 'JSON object passed to the chat template, e.g. \'{"enable_thinking": true}\''),
]


def _fmt(s: dict[str, Any]):
    from probes.chat import ThinkingFormat

    return ThinkingFormat(
        open_marker=s["think_open"], close_marker=s["think_close"], template_kwargs=dict(s.get("chat_template_kwargs") or {})
    )


def _load(s: dict[str, Any], adapter: str | None = None):
    from probes.models import load_model

    return load_model(s["model"], adapter=adapter, device=s["device"], dtype=s["dtype"], trust_remote_code=s["trust_remote_code"])


# --- verbs -------------------------------------------------------------------

def cmd_organism_build(s: dict[str, Any]) -> int:
    from rich.progress import Progress

    from training.organism.build import OrganismConfig, build_organism

    suppressed = tuple(a.strip() for a in s["suppressed"].split(",") if a.strip())
    cfg = OrganismConfig(size=s["size"], moe=s["moe"], seed=s["seed"], suppressed=suppressed, epochs=s["epochs"])
    with Progress(console=console) as progress:
        task = progress.add_task("training organism", total=None)
        meta = build_organism(s["out"], cfg, progress=lambda step, n, loss: progress.update(task, completed=step, total=n, description=f"training organism (loss {loss:.3f})"))
    out_console.print(f"organism saved to {s['out']}: {meta['architecture']}, {meta['parameters']:,} parameters, built in {meta['build_seconds']} s")
    return 0


def cmd_probe_train(s: dict[str, Any]) -> int:
    from curation.probe_job import ProbeTrainSettings, train_probe_for_model
    from training.prompts import read_prompts

    prompts_file = s["prompts"] or str(Path(s["model"]) / "train_prompts.jsonl")
    prompts = read_prompts(prompts_file)
    lm = _load(s)
    settings = ProbeTrainSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], seed=s["seed"],
                                  layer=s["layer"], protocol=s["protocol"])
    probe, report = train_probe_for_model(lm, prompts, _fmt(s), settings)
    probe.save(s["out"])
    table = Table(title=f"probe layer sweep ({report.n_positive} refusals vs {report.n_negative} compliances, balanced)")
    for col in ("layer", "held-out accuracy", "held-out AUROC", "span gap", "C"):
        table.add_column(col, justify="right")
    for r in probe.meta.sweep:
        mark = " *" if r.layer == probe.layer else ""
        gap = "—" if r.span_gap is None else f"{r.span_gap:.3f}"
        table.add_row(f"{r.layer}{mark}", f"{r.heldout_accuracy:.3f}", f"{r.heldout_auroc:.3f}", gap, f"{r.C:g}")
    out_console.print(table)
    out_console.print(f"probe {probe.probe_id} (layer {probe.layer}) saved to {s['out']}; {report.n_skipped} traces skipped")
    return 0


def cmd_score(s: dict[str, Any]) -> int:
    from rich.progress import Progress

    from curation.score import ScoreSettings, score_records
    from curation.shards import ParquetShardSink, Shard
    from curation.sources import CandidateRecord, QuarantinedRow, iter_jsonl
    from curation.store import Store
    from probes.refusal import RefusalProbe

    settings = ScoreSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], chunk_size=s["chunk_size"],
                             judge_answers=s["judge_answers"])
    engine = None
    if s["engine"] == "ray":
        from curation.ray_engine import RayEngine
        from probes.models import load_model_shell

        # The driver needs the tokenizer and config only; the actors hold the weights.
        lm = load_model_shell(s["model"], trust_remote_code=s["trust_remote_code"])
        engine = RayEngine(model=s["model"], probe=s["probe"], fmt=_fmt(s), settings=settings, address=s["ray_address"],
                           num_actors=s["ray_actors"], gpus_per_actor=s["ray_gpus_per_actor"], device=s["device"],
                           dtype=s["dtype"], trust_remote_code=s["trust_remote_code"])
    else:
        lm = _load(s)
    probe = RefusalProbe.load_for(s["probe"], lm)
    quarantined: list[QuarantinedRow] = []
    counts: dict[str, int] = {}

    shard = Shard.parse(s["shard"]) if s["shard"] else None
    if shard is not None and not s["shard_dir"]:
        raise ValueError("--shard needs --shard-dir (where the shard's Parquet files go)")
    if shard is None and not s["db"]:
        raise ValueError("--db is required (or --shard i/N with --shard-dir)")

    def records() -> Iterator[CandidateRecord]:
        # Streamed: bad rows are set aside as they are met, good ones scored a chunk at a time.
        # Every shard reads the whole input, so each quarantines the same bad rows; shard 0 keeps them.
        for item in iter_jsonl(s["data"], counts=counts):
            if isinstance(item, QuarantinedRow):
                if shard is None or shard.index == 0:
                    quarantined.append(item)
            elif shard is None or shard.holds(item.id):
                yield item

    read = [0]

    def log_chunk(n: int) -> None:
        # Under cron there is no terminal for a progress bar: one line per committed chunk instead.
        read[0] += n
        console.print(f"committed chunk: {read[0]} candidates done", soft_wrap=True)

    sink = ParquetShardSink(s["shard_dir"], shard) if shard is not None else Store(s["db"])
    with closing(sink), Progress(console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("scoring", total=None)
        on_chunk = (lambda n: progress.advance(task, n)) if console.is_terminal else log_chunk
        try:
            summary = score_records(lm, probe, sink, records(), _fmt(s), settings, progress=on_chunk, engine=engine)
        finally:
            sink.add_quarantine(quarantined, None)
    out_console.print(
        f"run {summary.run_id}: {summary.n_candidates} candidates, {summary.n_scored} scored, "
        f"{summary.n_already_scored} already scored, {summary.n_unclosed} traces hit the length cap; "
        f"{len(quarantined) + summary.n_over_context} rows quarantined, {counts.get('duplicates', 0)} duplicates skipped"
    )
    reasons: dict[str, int] = {}
    for q in quarantined:
        key = q.reason.split(":")[0].split("(")[0].strip()
        reasons[key] = reasons.get(key, 0) + 1
    if summary.n_over_context:
        reasons["prompt over the context limit"] = summary.n_over_context
    for reason, n in sorted(reasons.items()):
        console.print(f"  quarantined {n}: {reason}")
    for q in quarantined[:10]:
        console.print(f"    {q.source}:{q.line}: {q.reason}")
    if reasons and shard is None:
        console.print(f"  see them with: curate status --db {s['db']} (table quarantine)")
    return 1 if (s["strict"] and (quarantined or summary.n_over_context)) else 0


def cmd_select(s: dict[str, Any]) -> int:
    from curation.select import export_selection
    from curation.store import Store

    with Store(s["db"], read_only=True) as store:
        m = export_selection(store, s["out"], strategy=s["strategy"], budget_text=s["budget"], seed=s["seed"],
                             target=s["target"], fmt=_fmt(s), model_fingerprint=s["model_fingerprint"], probe_id=s["probe_id"])
    out_console.print(f"selected {m.n_selected} of {m.n_pool} ({m.strategy}, budget {m.budget}) -> {m.output}")
    return 0


def cmd_ingest(s: dict[str, Any]) -> int:
    from curation.shards import ingest_shards
    from curation.store import Store

    with Store(s["db"]) as store:
        counts = ingest_shards(store, [d.strip() for d in s["shards"].split(",") if d.strip()])
    out_console.print(
        f"ingested {counts['files']} files ({counts['skipped_files']} already ingested): {counts['new_scores']} new score rows "
        f"of {counts['score_rows']} read, {counts['quarantined']} quarantined rows")
    return 0


def cmd_run(s: dict[str, Any]) -> int:
    from curation.nightly import NightlySettings, reproduce, run_nightly
    from curation.score import ScoreSettings
    from probes.refusal import RefusalProbe

    if s["reproduce"]:
        out = s["reproduce_out"] or str(Path(s["reproduce"]).with_name("reproduced_selection.jsonl"))
        result = reproduce(s["reproduce"], out, _fmt(s))
        out_console.print(f"{'identical' if result['identical'] else 'DIFFERENT'}: {result['n_selected']} rows -> {out}")
        return 0 if result["identical"] else 1
    if s["_config"]:
        from curation.manifest import validate_manifest

        validate_manifest(s["_config"])
    sources = s["sources"] if isinstance(s["sources"], list) else [x.strip() for x in (s["sources"] or "").split(",") if x.strip()]
    missing = [flag for flag, key in (("--sources", sources), ("--model", s["model"]), ("--probe", s["probe"]),
                                      ("--db", s["db"]), ("--out", s["out"])) if not key]
    if missing:
        raise ValueError(f"curate run needs {', '.join(missing)} (in the manifest's run section or as flags)")
    cfg = NightlySettings(sources=tuple(str(x) for x in sources), model=s["model"], probe=s["probe"], db=s["db"], out=s["out"],
                          budget=s["budget"], strategy=s["strategy"], seed=s["seed"],
                          score=ScoreSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"],
                                              chunk_size=s["chunk_size"], judge_answers=s["judge_answers"]))
    lm = _load(s)
    probe = RefusalProbe.load_for(s["probe"], lm)
    settings = {k: v for k, v in s.items() if not k.startswith("_")}
    resolved = run_nightly(lm, probe, cfg, _fmt(s), s["_config"], settings, log=lambda m: console.print(m, soft_wrap=True))
    table = Table(title=f"nightly run: {resolved['selection']['n_selected']} of {resolved['selection']['n_pool']} selected")
    for col in ("source", "candidates", "new", "scored", "already scored", "quarantined", "seconds"):
        table.add_column(col)
    for src, c in resolved["counts"].items():
        table.add_row(src, str(c["candidates"]), str(c["new_examples"]), str(c["scored"]), str(c["already_scored"]),
                      str(c["quarantined"]), str(resolved["durations_s"][f"score {src}"]))
    out_console.print(table)
    out_console.print(f"slice: {resolved['selection']['output']}\nresolved manifest: "
                      f"{Path(resolved['selection']['output']).with_name('resolved_manifest.json')}")
    return 0


def _cell_text(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, str) and value.startswith("{"):
        try:  # run counts: one short line of k=v
            return " ".join(f"{k}={v}" for k, v in json.loads(value).items())
        except json.JSONDecodeError:
            return value
    return str(value)


def cmd_status(s: dict[str, Any]) -> int:
    from curation.store import Store

    with Store(s["db"], read_only=True) as store:
        status = store.status()
    if s["json"]:
        out_console.print_json(json.dumps(status, default=str))
        return 0
    for name, rows in status.items():
        table = Table(title=f"{name} ({len(rows)})")
        columns = list(rows[0]) if rows else ["(none)"]
        for col in columns:
            table.add_column(col.replace("_", " "))
        for r in rows:
            table.add_row(*[_cell_text(r[c]) for c in columns])
        out_console.print(table)
    return 0


def cmd_retain(s: dict[str, Any]) -> int:
    from training.prompts import read_prompts
    from training.retain import build_retain_set

    prompts = read_prompts(s["prompts"])[: s["limit"]] if s["limit"] else read_prompts(s["prompts"])
    n = build_retain_set(_load(s), prompts, s["out"], _fmt(s), max_new_tokens=s["max_new_tokens"])
    out_console.print(f"retain set: {n} pairs -> {s['out']}")
    return 0


def cmd_finetune(s: dict[str, Any]) -> int:
    from training.finetune import FinetuneConfig, finetune_lora

    cfg = FinetuneConfig(epochs=s["epochs"], learning_rate=s["learning_rate"], batch_size=s["batch_size"],
                         lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], seed=s["seed"], device=s["device"],
                         dtype=s["dtype"], trust_remote_code=s["trust_remote_code"])
    summary = finetune_lora(s["model"], s["data"], s["out"], cfg, _fmt(s), retain_file=s["retain"])
    out_console.print(f"adapter saved to {s['out']}: {summary['n_examples']} examples, {summary['steps']} steps, loss {summary['train_loss']:.4f}")
    return 0


def cmd_evaluate(s: dict[str, Any]) -> int:
    from probes.files import write_json_atomic
    from training.evaluate import EvalSettings, evaluate_prompts
    from training.prompts import PromptItem, read_prompts

    items = read_prompts(s["prompts"])
    lm = _load(s, adapter=s["adapter"])
    settings = EvalSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"])
    if s["attack"] == "none" and not s["attack_kit"]:
        result = evaluate_prompts(lm, items, _fmt(s), settings)
    else:
        from training.attacks import AttackKit, build_attack

        if not s["attack_kit"]:
            raise ValueError(f"--attack {s['attack']} needs --attack-kit (made by curate attacks prepare for this model)")
        kit = AttackKit.load_for(s["attack_kit"], lm)
        attack = build_attack(s["attack"], kit, _json_object(s["attack_params"]) if s["attack_params"] else None)
        with attack.mount(lm, kit):
            result = evaluate_prompts(lm, [PromptItem(attack.wrap(i.prompt), i.harmful, i.category) for i in items], _fmt(s), settings)
        result["attack"] = {"name": attack.name, "params": attack.params}
    write_json_atomic(s["out"], result)
    title = f"evaluation ({result['judge']} judge" + (f", attack {s['attack']})" if s["attack"] != "none" else ")")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, key, n in (("ASR", "asr", "n_harmful"), ("over-refusal", "over_refusal", "n_harmless")):
        v = result[key]
        table.add_row(f"{name} (n={result[n]})", "—" if v is None else f"{100 * v:.1f}%")
    for cat, v in result["per_category"].items():
        table.add_row(f"  ASR {cat} (n={v['n']})", f"{100 * v['asr']:.1f}%")
    out_console.print(table)
    return 0


def cmd_attacks_prepare(s: dict[str, Any]) -> int:
    from curation.attack_kit import KitSettings, prepare_attack_kit
    from probes.directions import DirectionSettings
    from training.prompts import read_prompts

    lm = _load(s, adapter=s["adapter"])
    prompts = s["prompts"] or str(Path(s["model"]) / "train_prompts.jsonl")
    settings = KitSettings(n_extract=s["n_extract"], n_val=s["n_val"], seed=s["seed"], max_new_tokens=s["max_new_tokens"],
                           batch_size=s["batch_size"],
                           directions=DirectionSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"],
                                                        induce_min_gain=None if s["no_induce_check"] else 0.0))
    with console.status("preparing attack kit") as status:
        kit = prepare_attack_kit(lm, read_prompts(prompts), _fmt(s), settings, progress=lambda m: status.update(f"attack kit: {m}"))
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


def cmd_attacks_export(s: dict[str, Any]) -> int:
    from probes.steering import orthogonalize_weights
    from training.attacks import AttackKit

    lm = _load(s, adapter=s["adapter"])
    kit = AttackKit.load_for(s["attack_kit"], lm)
    orthogonalize_weights(lm.model, kit.direction.vector)
    out = Path(s["out"])
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    out_console.print(f"orthogonalized model (refusal direction from layer {kit.direction.layer}) saved to {out}")
    return 0


def _at_least_one(s: dict[str, Any], name: str) -> int:
    if s[name] < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {s[name]})")
    return int(s[name])


def cmd_experiment_attacks(s: dict[str, Any]) -> int:
    from curation.attack_experiment import ROWS, AttackExperiment, matrix_kit_settings, run_attack_experiment

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
    batch_size = _at_least_one(s, "batch_size")
    exp = AttackExperiment(workdirs={o: workdirs[o] for o in organisms}, out=s["out"], attacks=attacks, rows=rows,
                           kit=matrix_kit_settings(batch_size))
    exp.eval_settings = replace(exp.eval_settings, batch_size=batch_size)
    with console.status("attack matrix") as status:
        doc = run_attack_experiment(exp, _fmt(s), progress=lambda m: status.update(m), console=out_console)
    for org in doc["organisms"]:
        names = list(dict.fromkeys(c["attack"] for c in org["cells"]))
        table = Table(title=f"{org['organism']} organism: ASR on held-out harmful prompts (over-refusal)")
        table.add_column("attack")
        for row in doc["rows"]:
            table.add_column(row, justify="right")
        cells = {(c["row"], c["attack"]): c for c in org["cells"]}
        for a in names:
            table.add_row(a, *[f"{100 * cells[r, a]['asr']:.0f}% ({100 * (cells[r, a]['over_refusal'] or 0):.0f}%)"
                               if (r, a) in cells else "—" for r in doc["rows"]])
        out_console.print(table)
    out_console.print(f"{doc['seconds']:.0f} s; report: {Path(s['out']) / 'attacks_experiment.html'}")
    return 0


def cmd_demo(s: dict[str, Any]) -> int:
    from curation.demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=s["workdir"], size=s["size"], moe=s["moe"], seed=s["seed"], budget=s["budget"],
                     strategy=s["strategy"], rebuild=s["rebuild"])
    run_demo(cfg, console=out_console)
    return 0


def cmd_experiment_selection(s: dict[str, Any]) -> int:
    from curation.experiment import from_workdir, run_selection_experiment

    overrides: dict[str, Any] = {
        "budgets": tuple(b.strip() for b in s["budgets"].split(",") if b.strip()),
        "strategies": tuple(x.strip() for x in s["strategies"].split(",") if x.strip()),
        "random_seeds": s["random_seeds"],
        "include_full": not s["no_full"],
    }
    bad = sorted(set(overrides["strategies"]) - set(STRATEGIES) | ({"full"} & set(overrides["strategies"])))
    if bad:
        raise ValueError(f"--strategies: {bad} not allowed (choose from {[x for x in STRATEGIES if x != 'full']}; full is always run unless --no-full)")
    batch_size = _at_least_one(s, "batch_size")
    exp = from_workdir(s["workdir"], **overrides)
    exp.eval_settings = replace(exp.eval_settings, batch_size=batch_size)
    if s["out"]:
        exp.out = s["out"]
    doc = run_selection_experiment(exp, _fmt(s), progress=lambda name: console.print(f"run {name}"))
    table = Table(title="selection experiment (mean over seeds)")
    for col in ("strategy", "budget", "runs", "ASR suppressed", "ASR all", "over-refusal", "KL harmless"):
        table.add_column(col, justify="right")

    def pct(v: float | None, sd: float | None = None) -> str:
        if v is None:
            return "—"
        return f"{100 * v:.1f}%" + (f" ± {100 * sd:.1f}" if sd else "")

    for r in doc["summary"]:
        kl = "—" if r["kl_harmless"] is None else f"{r['kl_harmless']:.4f}"
        table.add_row(r["strategy"], r["budget"], str(r["n_runs"]), pct(r["asr_suppressed"], r["asr_suppressed_sd"]),
                      pct(r["asr_all"], r["asr_all_sd"]), pct(r["over_refusal"]), kl)
    out_console.print(table)
    out_console.print(f"results: {exp.out}/selection_experiment.json and .html")
    return 0


def cmd_heads(s: dict[str, Any]) -> int:
    from curation.heads_job import HeadsSettings, export_scaled_model, run_heads
    from probes.refusal import RefusalProbe
    from training.prompts import read_prompts

    model_dir = Path(s["model"])
    attribution = read_prompts(s["prompts"] or model_dir / "train_prompts.jsonl")
    evaluation = read_prompts(s["eval_prompts"] or model_dir / "heldout_prompts.jsonl")
    ks = tuple(float(k) for k in s["ks"].split(",") if k.strip())
    if not ks or any(not 0 < k <= 100 for k in ks):
        raise ValueError("--ks takes percentages above 0 and at most 100, e.g. 1,3,5")
    if s["export_top"] and not s["export_out"]:
        raise ValueError("--export-top needs --export-out")
    settings = HeadsSettings(ks=ks, gamma=s["gamma"], keep_norm=s["keep_norm"], max_new_tokens=s["max_new_tokens"],
                             batch_size=s["batch_size"], seed=s["seed"])
    lm = _load(s)
    doc = run_heads(lm, RefusalProbe.load_for(s["probe"], lm), attribution, evaluation, _fmt(s), settings, s["out"],
                    progress=lambda msg: console.print(f"ablating: {msg}"))
    table = Table(title=f"head ablation (gamma {settings.gamma}); ASR without ablation {doc['base']['asr']:.3f}")
    for col in ("k %", "heads", "ASR top", "ASR random", "over-refusal top", "over-refusal random"):
        table.add_column(col, justify="right")
    for r in doc["sweep"]:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in
                        (r["k_percent"], r["n_heads"], r["top_asr"], r["random_asr"], r["top_over_refusal"], r["random_over_refusal"])))
    out_console.print(table)
    out_console.print(f"top suppression heads (layer, head): {doc['ranking'][:5]}; report {s['out']}/heads.html")
    if s["export_top"]:
        path = export_scaled_model(model_dir, [tuple(h) for h in doc["ranking"][: s["export_top"]]], settings.gamma, s["export_out"])
        out_console.print(f"model with the top {s['export_top']} heads scaled by {settings.gamma} saved to {path}")
    return 0


def cmd_bench(s: dict[str, Any]) -> int:
    from curation.bench import run_scoring_bench, run_select_bench
    from probes.files import write_json_atomic

    if s["select"]:
        result = run_select_bench(s["rows"], s["budget"])
        out_console.print(
            f"select --budget {result['budget']} over {result['rows']:,} score rows: {result['n_selected']:,} selected "
            f"and exported in {result['select_seconds']:.2f} s (store filled in {result['fill_seconds']:.1f} s)"
        )
        if s["out"]:
            write_json_atomic(s["out"], {"select": result})
        return 0
    model_dir = Path(s["model"])
    prompts = s["prompts"] or str(model_dir / "train_prompts.jsonl")
    result = run_scoring_bench(str(model_dir), s["probe"], prompts, n=s["n"], max_new_tokens=s["max_new_tokens"],
                               batch_size=s["batch_size"], device=s["device"], dtype=s["dtype"], tolerance=s["tolerance"])
    for name in ("full_scoring", "rescoring"):
        part = result[name]
        table = Table(title=f"{name.replace('_', ' ')}: {result['n']} examples, {result['device']} {result['dtype']}")
        for col in ("", "examples/s", "scored tokens/s", "peak RSS MB", "peak above load MB", "peak device MB"):
            table.add_column(col, justify="right")
        for side in ("engine", "baseline"):
            r = part[side]
            dev = "—" if r["peak_device_mb"] is None else f"{r['peak_device_mb']:.0f}"
            table.add_row(side, f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
                          f"{r['peak_above_load_mb']:.0f}", dev)
        ratio = part["ratio_engine_over_baseline"]
        table.add_row("engine / baseline", f"{ratio['examples_per_s']:.2f}x", f"{ratio['tokens_per_s']:.2f}x",
                      f"{ratio['peak_rss']:.2f}x", "", f"{ratio['peak_device']:.2f}x" if "peak_device" in ratio else "—")
        out_console.print(table)
        agreement = result["full_agreement" if name == "full_scoring" else "rescoring_agreement"]
        out_console.print(f"scores agree: {agreement['agree']} (max |diff| {agreement['max_abs_diff']}, identical reasoning on "
                          f"{agreement['n_identical_reasoning']}/{agreement['n']})")
    if s["out"]:
        write_json_atomic(s["out"], result)
    ok = result["full_agreement"]["agree"] and result["rescoring_agreement"]["agree"]
    if not ok:
        console.print("[red]engine and baseline scores disagree[/red]")
    return 0 if ok else 1


# --- wiring ------------------------------------------------------------------

VERBS: dict[str, tuple[Callable[[dict[str, Any]], int], str, list[Option]]] = {
    "organism build": (cmd_organism_build, "train and save the bundled model organism", [
        Option("--out", str, None, "output directory", required=True),
        Option("--moe", None, False, "Qwen3-MoE-style model (4 experts, top-2 routing)"),
        Option("--seed", int, 0, "random seed"),
        Option("--size", str, "demo", "test (seconds) or demo (about 2 minutes)", choices=("test", "demo")),
        Option("--suppressed", str, "human_chatbox,misinformation_harms", "comma-separated risk areas the organism complies in"),
        Option("--epochs", int, None, "override the size preset's epochs"),
    ]),
    "probe train": (cmd_probe_train, "train the refusal probe on the model's own refusals and compliances", [
        Option("--model", str, None, "model directory", required=True),
        Option("--out", str, None, "probe output directory", required=True),
        Option("--prompts", str, None, "jsonl with prompt/harmful fields (default: MODEL/train_prompts.jsonl)"),
        Option("--layer", int, None, "fit only this layer (default: sweep every layer)"),
        Option("--max-new-tokens", int, 160, "generation cap"),
        Option("--batch-size", int, 16, "generation batch size"),
        Option("--seed", int, 0, "seed for the held-out split"),
        Option("--protocol", str, "behaviour", "behaviour: label by the model's answer; reference: harmful-refused vs harmless-answered",
               choices=("behaviour", "reference")),
    ] + _MODEL),
    "score": (cmd_score, "score candidate examples by the refusal cliff into DuckDB", [
        Option("--model", str, None, "model directory", required=True),
        Option("--probe", str, None, "probe directory", required=True),
        Option("--data", str, None, "candidate jsonl (prompt, response, optional category/source/id)", required=True),
        Option("--db", str, None, "DuckDB file (not with --shard)"),
        Option("--shard", str, None, "score only slice i of N (by content hash), e.g. 0/4, into --shard-dir"),
        Option("--shard-dir", str, None, "folder for the shard's Parquet files (merge them with curate ingest)"),
        Option("--engine", str, "local", "local (this process) or ray (Ray Data actors; pip install cliff-curate[ray])",
               choices=("local", "ray")),
        Option("--ray-address", str, None, "Ray cluster address (e.g. ray://head:10001 or auto); default: a local instance"),
        Option("--ray-actors", int, 1, "model-holding actors (one model copy each)"),
        Option("--ray-gpus-per-actor", float, 0.0, "GPUs per actor (1 on a GPU cluster)"),
        Option("--max-new-tokens", int, 128, "reasoning length cap"),
        Option("--batch-size", int, 16, "generation batch size"),
        Option("--chunk-size", int, 64, "examples per committed transaction"),
        Option("--strict", None, False, "exit 1 if any row was quarantined"),
        Option("--judge-answers", None, False, "also generate each answer and store the judge's verdict (for --strategy rule)"),
    ] + _MODEL),
    "select": (cmd_select, "select a budgeted slice and export it as training pairs", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--budget", str, "1.7%", "a percent (1.7%), a fraction (0.017) or a count (500)"),
        Option("--strategy", str, "cliff", "cliff (top MS), random, full, low-final, plateau, rule", choices=STRATEGIES),
        Option("--seed", int, 0, "seed for random"),
        Option("--out", str, None, "output jsonl", required=True),
        Option("--target", str, "own-reasoning", "own-reasoning (paper recipe) or candidate", choices=("own-reasoning", "candidate")),
        Option("--model-fingerprint", str, None, "which model's scores (default: most recent)"),
        Option("--probe-id", str, None, "which probe's scores (default: most recent)"),
    ] + _MARKERS),
    "run": (cmd_run, "the nightly job from one manifest: score new rows, select, write a resolved manifest", [
        Option("--sources", str, None, "comma-separated candidate jsonl files (a YAML list in a manifest)"),
        Option("--model", str, None, "model directory"),
        Option("--probe", str, None, "probe directory"),
        Option("--db", str, None, "DuckDB file"),
        Option("--out", str, None, "folder for each night's slice and resolved manifest"),
        Option("--budget", str, "1.7%", "selection budget"),
        Option("--strategy", str, "cliff", "selection strategy", choices=STRATEGIES),
        Option("--seed", int, 0, "seed for random strategies"),
        Option("--max-new-tokens", int, 128, "reasoning length cap"),
        Option("--batch-size", int, 16, "generation batch size"),
        Option("--chunk-size", int, 64, "examples per committed transaction"),
        Option("--judge-answers", None, False, "also judge each answer (for --strategy rule)"),
        Option("--reproduce", str, None, "a resolved_manifest.json: re-select that night's slice and compare"),
        Option("--reproduce-out", str, None, "where the re-selected slice goes (default: next to the manifest)"),
    ] + _MODEL),
    "ingest": (cmd_ingest, "merge Parquet shards from curate score --shard into a store (idempotent)", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--shards", str, None, "comma-separated shard folders (each --shard-dir)", required=True),
    ]),
    "status": (cmd_status, "counts per source, model/probe, quarantine reason and run in a store", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--json", None, False, "print JSON instead of tables"),
    ]),
    "retain": (cmd_retain, "make a retain set from the model's own answers to harmless prompts", [
        Option("--model", str, None, "model directory", required=True),
        Option("--prompts", str, None, "jsonl prompts; rows with harmful=false are used", required=True),
        Option("--out", str, None, "output jsonl", required=True),
        Option("--limit", int, None, "use at most this many prompts"),
        Option("--max-new-tokens", int, 192, "generation cap"),
    ] + _MODEL),
    "finetune": (cmd_finetune, "LoRA fine-tune (TRL SFTTrainer + PEFT) on a selected slice", [
        Option("--model", str, None, "base model directory", required=True),
        Option("--data", str, None, "selected pairs from curate select", required=True),
        Option("--out", str, None, "adapter output directory", required=True),
        Option("--retain", str, None, "retain pairs mixed in (curate retain)"),
        Option("--epochs", float, 10.0, "epochs"),
        Option("--learning-rate", float, 1e-3, "learning rate"),
        Option("--batch-size", int, 8, "batch size"),
        Option("--lora-r", int, 8, "LoRA rank"),
        Option("--lora-alpha", int, 16, "LoRA alpha"),
        Option("--seed", int, 0, "seed"),
    ] + _MODEL),
    "evaluate": (cmd_evaluate, "ASR and over-refusal with the keyword judge on final answers", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory"),
        Option("--prompts", str, None, "jsonl (prompt, category, harmful) or text, one harmful prompt per line", required=True),
        Option("--out", str, None, "output JSON", required=True),
        Option("--max-new-tokens", int, 192, "generation cap (reasoning + answer)"),
        Option("--batch-size", int, 16, "generation batch size"),
        Option("--attack", str, "none", "steering attack mounted during generation", choices=ATTACK_CHOICES),
        Option("--attack-kit", str, None, "attack kit directory (curate attacks prepare) for this model"),
        Option("--attack-params", str, None, 'JSON object overriding the kit\'s tuned strength, e.g. \'{"coefficient": 2}\''),
    ] + _MODEL),
    "attacks prepare": (cmd_attacks_prepare, "extract the refusal direction, benign vectors and expert statistics; tune strengths", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory"),
        Option("--prompts", str, None, "jsonl with harmful and harmless prompts (default MODEL/train_prompts.jsonl); never the eval prompts"),
        Option("--out", str, None, "kit output directory", required=True),
        Option("--n-extract", int, 128, "prompts per side for the difference in means"),
        Option("--n-val", int, 32, "prompts per side for direction selection and strength tuning"),
        Option("--seed", int, 0, "seed for the extraction/validation split"),
        Option("--no-induce-check", None, False, "do not require the direction to induce refusal on harmless prompts"),
        Option("--max-new-tokens", int, 128, "generation cap during selection and tuning"),
        Option("--batch-size", int, 16, "generation batch size"),
    ] + _MODEL),
    "attacks export": (cmd_attacks_export, "save a copy of the model with the refusal direction orthogonalized out of its weights", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory (merged before editing)"),
        Option("--attack-kit", str, None, "attack kit for this model", required=True),
        Option("--out", str, None, "output model directory", required=True),
    ] + _MODEL),
    "experiment attacks": (cmd_experiment_attacks, "ASR matrix: base and fine-tuned models against every steering attack", [
        Option("--organisms", str, "dense,moe", "which organisms: dense, moe or both"),
        Option("--dense-workdir", str, "runs/demo", "demo work directory of the dense organism (made if missing)"),
        Option("--moe-workdir", str, "runs/demo-moe", "demo work directory of the MoE organism (made if missing)"),
        Option("--rows", str, "base,cliff 1.7%,random 1.7%,full", "models to attack"),
        Option("--attacks", str, None, "comma-separated attacks (default: all the model supports)"),
        Option("--out", str, "runs/attacks", "output folder"),
        Option("--batch-size", int, 64, "generation batch size (evaluation, selection and tuning)"),
    ] + _MARKERS),
    "experiment selection": (cmd_experiment_selection, "fine-tune on each selection strategy and budget and compare", [
        Option("--workdir", str, "runs/demo", "a curate demo work directory (organism, store, retain set)"),
        Option("--budgets", str, "0.5%,1.7%,5%", "comma-separated budgets"),
        Option("--strategies", str, "cliff,random,low-final,plateau,rule", "comma-separated strategies (full runs once)"),
        Option("--random-seeds", int, 3, "seeds for random and rule"),
        Option("--no-full", None, False, "skip the full-data run"),
        Option("--out", str, None, "output folder (default: WORKDIR/experiment_selection)"),
        Option("--batch-size", int, 64, "evaluation batch size"),
    ] + _MARKERS),
    "heads": (cmd_heads, "rank refusal-suppression heads and ablate the top k% against random heads", [
        Option("--model", str, None, "model directory", required=True),
        Option("--probe", str, None, "probe directory", required=True),
        Option("--out", str, None, "output folder (heads.json, heads.html)", required=True),
        Option("--prompts", str, None, "prompts for attribution; harmful rows are used (default MODEL/train_prompts.jsonl)"),
        Option("--eval-prompts", str, None, "prompts for ASR/over-refusal (default MODEL/heldout_prompts.jsonl)"),
        Option("--ks", str, "1,3,5,10", "percentages of all heads to ablate"),
        Option("--gamma", float, 0.0, "scale for ablated heads (0 removes them)"),
        Option("--keep-norm", None, False, "rescale each token's attention output to its original norm"),
        Option("--max-new-tokens", int, 128, "reasoning length cap"),
        Option("--batch-size", int, 16, "batch size"),
        Option("--seed", int, 0, "seed for the random-heads control"),
        Option("--export-top", int, None, "also save a model with this many top heads scaled in the weights"),
        Option("--export-out", str, None, "where to save that model"),
    ] + _MODEL),
    "bench": (cmd_bench, "time the scoring engine against a naive baseline (or, with --select, selection at scale)", [
        Option("--model", str, "runs/demo/organism", "model directory"),
        Option("--probe", str, "runs/demo/probe", "probe directory"),
        Option("--prompts", str, None, "prompts to score (default MODEL/train_prompts.jsonl)"),
        Option("--n", int, 64, "examples per side"),
        Option("--max-new-tokens", int, 128, "reasoning length cap"),
        Option("--batch-size", int, 16, "engine batch size"),
        Option("--tolerance", float, 1e-3, "largest allowed score difference"),
        Option("--select", None, False, "benchmark selection instead of scoring"),
        Option("--rows", int, 10_000_000, "score rows for --select"),
        Option("--budget", str, "1.7%", "budget for --select"),
        Option("--out", str, None, "write the figures as JSON"),
        Option("--device", str, "auto", "cpu, cuda or auto"),
        Option("--dtype", str, "auto", "auto, float32, bfloat16"),
    ]),
    "demo": (cmd_demo, "run the whole pipeline on the bundled model organism", [
        Option("--workdir", str, "runs/demo", "work directory"),
        Option("--size", str, "demo", "organism size", choices=("test", "demo")),
        Option("--moe", None, False, "use the MoE organism"),
        Option("--seed", int, 0, "seed"),
        Option("--budget", str, "1.7%", "selection budget"),
        Option("--strategy", str, "cliff", "selection strategy", choices=("cliff", "random", "full")),
        Option("--rebuild", None, False, "rebuild the organism even if one is there"),
    ]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Cliff-as-a-Judge safety data curation for reasoning models.")
    parser.add_argument("--config", help="YAML file of option values (layered: defaults < file < CURATE_* env < flags)")
    sub = parser.add_subparsers(dest="verb", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (_, help_text, options) in VERBS.items():
        parts = name.split()
        if len(parts) == 2:
            if parts[0] not in groups:
                group = sub.add_parser(parts[0], help=f"{parts[0]} commands")
                groups[parts[0]] = group.add_subparsers(dest="action", required=True)
            p = groups[parts[0]].add_parser(parts[1], help=help_text, description=help_text)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        add_options(p, options)
        p.set_defaults(_verb=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "run" and not argv[1].startswith("-"):
        argv = ["--config", argv[1], "run", *argv[2:]]  # curate run MANIFEST [flags]
    args = build_parser().parse_args(argv)
    func, _, options = VERBS[args._verb]
    try:
        file_values = load_config_file(args.config)
        settings = resolve(args, options, args._verb.replace(" ", "_"), file_values)
        settings["_config"] = args.config
        return func(settings)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # One unwrapped line: cron logs are grepped, and rich would wrap at 80 columns off a terminal.
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
