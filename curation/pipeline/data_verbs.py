"""The data pipeline's verbs: score, select, ingest, status and the nightly run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from rich.table import Table

from curation.cli.options import Option
from curation.cli.verb import (
    DATA_OPTIONS,
    GENERATION_OPTIONS,
    JUDGE_OPTION,
    MARKER_OPTIONS,
    MODEL_OPTIONS,
    Output,
    Settings,
    Verb,
    check_input_file,
    console,
    layout_from,
    load_model_from,
    out_console,
    sampling_from,
    single_judge,
    thinking_format,
    warn_unclosed,
)
from curation.pipeline.generator_choice import GENERATOR_OPTIONS, generation_engine
from curation.pipeline.select import STRATEGIES
from probes.chat import ThinkingFormat


def run_score(s: Settings) -> int:
    from curation.pipeline.score import ScoreSettings, score_records
    from curation.pipeline.shards import ParquetShardSink, Shard
    from curation.pipeline.sources import CandidateRecord, QuarantinedRow, iter_candidates
    from curation.pipeline.store import Store
    from probes.refusal import RefusalProbe

    settings = ScoreSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], chunk_size=s["chunk_size"],
                             judge_answers=s["judge_answers"], answer_tokens=s["answer_tokens"], judge=single_judge(s, "score"))
    shard = Shard.parse(s["shard"]) if s["shard"] else None
    if shard is not None and not s["shard_dir"]:
        raise ValueError("--shard needs --shard-dir (where the shard's Parquet files go)")
    if shard is None and s["db"] is None:
        raise ValueError("--db is required (or --shard i/N with --shard-dir)")
    check_input_file(s["data"], "--data")
    from probes.files import path_sha256
    from probes.rows import expand

    # Hashed once, up front: the run records what it read, and the slice's card names it.
    inputs = [{"path": str(p), "sha256": path_sha256(p)} for p in expand(s["data"], "--data")]
    # The store first: a second writer is refused before minutes go into loading a model.
    sink = ParquetShardSink(s["shard_dir"], shard) if shard is not None else Store(s["db"])
    with closing(sink):
        engine = None
        if s["engine"] == "ray":
            from curation.pipeline.ray_engine import RayEngine
            from probes.models import load_model_shell

            # The driver needs the tokenizer and config only; the actors hold the weights.
            # One explicit dtype for the driver's record and every actor: "auto" would resolve on each machine.
            dtype = s["dtype"] if s["dtype"] != "auto" else ("bfloat16" if s["ray_gpus_per_actor"] > 0 else "float32")
            lm = load_model_shell(s["model"], trust_remote_code=s["trust_remote_code"], dtype=dtype)
            lm.sampling = sampling_from(s)  # recorded by the run; each actor decodes with it
            engine = RayEngine(model=s["model"], probe=s["probe"], fmt=thinking_format(s), settings=settings,
                               address=s["ray_address"], num_actors=s["ray_actors"], gpus_per_actor=s["ray_gpus_per_actor"],
                               device=s["device"], dtype=dtype, trust_remote_code=s["trust_remote_code"],
                               sampling=lm.sampling)
        else:
            lm = load_model_from(s)
        if engine is not None and s["generator"] != "hf":
            raise ValueError("--engine ray generates inside its actors: use --generator hf with it, or --engine local with "
                             "--generator vllm (several servers behind one --generator-url scale that out)")
        probe = RefusalProbe.load_for(s["probe"], lm)
        unreadable: list[QuarantinedRow] = []
        counts: dict[str, int] = {}

        def records() -> Iterator[CandidateRecord | QuarantinedRow]:
            # Streamed: bad rows pass through to be quarantined with the run's id, good ones are scored a
            # chunk at a time. Every shard reads the whole input, so each meets the same bad rows; shard 0 keeps them.
            for item in iter_candidates(s["data"], counts=counts, layout=layout_from(s)):
                if isinstance(item, QuarantinedRow):
                    if shard is None or shard.index == 0:
                        unreadable.append(item)
                        yield item
                elif shard is None or shard.holds(item.id):
                    yield item

        from curation.cli.progress import track
        from probes.rows import count_rows

        # Under cron there is no terminal for a bar: one line per committed chunk instead.
        log_dir = Path(s["db"]).parent if s["db"] else Path(s["shard_dir"])
        with (generation_engine(s, lm, log_dir),
              track("committed chunk", total=None if shard else count_rows(s["data"]), unit="candidates") as on_chunk):
            summary = score_records(lm, probe, sink, records(), thinking_format(s), settings, progress=on_chunk, engine=engine,
                                    inputs=inputs)
    table = Table(title=f"score run {summary.run_id}")
    table.add_column("")
    table.add_column("rows", justify="right")
    for label, value in (("candidates", summary.n_candidates), ("scored", summary.n_scored),
                         ("  generated now", summary.n_generated), ("  from stored or shared generations", summary.n_reused_generations),
                         ("already scored (same generation settings)", summary.n_already_scored),
                         ("unclosed (reasoning hit --max-new-tokens)", summary.n_unclosed),
                         ("quarantined", summary.n_quarantined), ("  not seen before", summary.n_quarantined_new),
                         ("duplicates kept as aliases", counts.get("duplicates", 0))):
        table.add_row(label, str(value))
    (console if s["json"] else out_console).print(table)
    reasons: dict[str, int] = {}
    for q in unreadable:
        key = q.reason.split(":")[0].split("(")[0].strip()
        reasons[key] = reasons.get(key, 0) + 1
    if summary.n_over_context:
        reasons["prompt over the context limit"] = summary.n_over_context
    other = summary.n_quarantined - len(unreadable) - summary.n_over_context
    if other:
        reasons["id reused for other content or scoring failed"] = other
    for reason, n in sorted(reasons.items()):
        console.print(f"  quarantined {n}: {reason}", soft_wrap=True, highlight=False, markup=False)
    for q in unreadable[:10]:
        console.print(f"    {q.source}:{q.line}: {q.reason}", soft_wrap=True, highlight=False, markup=False)
    if reasons and shard is None:
        console.print(f"  see them with: curate status --db {s['db']} (table quarantine)", soft_wrap=True, markup=False)
    warn_unclosed("score", summary.n_unclosed, summary.n_scored)
    if s["json"]:  # the last line of stdout, for scripts
        print(json.dumps({**summary.as_json(), "n_duplicates": counts.get("duplicates", 0)}))
    return 1 if (s["strict"] and summary.n_quarantined) else 0


SCORE_VERB = Verb("score", "score candidate examples by the refusal cliff into DuckDB", [
        Option("--model", str, None, "model directory", required=True),
        Option("--probe", str, None, "probe directory", required=True),
        Option("--data", str, None, "candidate jsonl (prompt, response, optional category/source/id)", required=True),
        Option("--db", str, None, "DuckDB file (not with --shard)"),
        Option("--shard", str, None, "score only slice i of N (by content hash), e.g. 0/4, into --shard-dir"),
        Option("--shard-dir", str, None, "folder for the shard's Parquet files (merge them with curate ingest)"),
        Option("--engine", str, "local", "local (this process) or ray (Ray Data actors; pip install cliff-curate[ray])",
               choices=("local", "ray")),
        Option("--ray-address", str, None, "Ray cluster address (e.g. ray://head:10001 or auto); default: a local instance"),
        Option("--ray-actors", int, 1, "model-holding actors (one model copy each)", minimum=1),
        Option("--ray-gpus-per-actor", float, 0.0, "GPUs per actor (1 on a GPU cluster)"),
        *GENERATOR_OPTIONS,
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
        Option("--batch-size", int, 16, "generation batch size", minimum=1),
        Option("--chunk-size", int, 64, "examples per committed transaction", minimum=1),
        Option("--strict", None, False, "exit 1 if any row was quarantined"),
        Option("--judge-answers", None, False, "also generate each answer and store the judge's verdict (for --strategy rule)"),
        Option("--json", None, False, "print the run's summary as one JSON object, the last line of stdout"),
] + MODEL_OPTIONS + DATA_OPTIONS, run_score,
    outputs=(Output("--db", appends=True), Output("--shard-dir", folder=True, appends=True)), inputs=("--model", "--probe", "--data"))


def given_format(s: Settings) -> ThinkingFormat | None:
    """The format named on the command line (--model's family, the marker flags), or None when
    none was: the store's record of the pool's format then decides."""
    # A recipe's model may be a hub name (no directory here): it names no format select can read.
    named = bool(s.get("model")) and Path(s["model"]).is_dir()
    return thinking_format(s) if named or s.get("think_open") or s.get("think_close") else None


def run_select(s: Settings) -> int:
    from curation.pipeline.select import export_selection
    from curation.pipeline.store import Store

    with Store(s["db"], read_only=True, on_wait=lambda m: console.print(m, soft_wrap=True, markup=False)) as store:
        _check_running(store, bool(s["allow_running"]))
        m = export_selection(store, s["out"], strategy=s["strategy"], budget_text=s["budget"], seed=s["seed"],
                             target=s["target"], fmt=given_format(s), model_fingerprint=s["model_fingerprint"], probe_id=s["probe_id"],
                             out_format=s["out_format"], include_unclosed=s["include_unclosed"],
                             settings_sha256=s["generation_settings"])
    out_console.print(f"selected {m.n_selected} of {m.n_pool} ({m.strategy}, budget {m.budget}) -> {m.output} ({m.out_format}); "
                      f"card {m.card}")
    left = {k: v for k, v in (m.left_out or {}).items() if v}
    if left:
        console.print("left out of the pool: " + ", ".join(f"{n} {why.replace('_', '-')}" for why, n in left.items())
                      + ("" if m.include_unclosed else " (unclosed: reasoning hit the length cap; --include-unclosed keeps them)"),
                      soft_wrap=True, markup=False)
    return 0


def _check_running(store, allow: bool) -> None:
    """A pool still being scored is partial: refused unless --allow-running; a run marked running with
    no writer holding the store was cut off, and the pool holds what it stored before: a warning."""
    from curation.pipeline.store import writer_holding

    running = [r for r in store.running_runs() if r[1] in ("score", "nightly", "generations import")]
    if not running:
        return
    run_id, kind, started = running[0]
    holder = writer_holding(store.path)
    if holder is not None and not allow:
        raise ValueError(f"{store.path}: {kind} run {run_id[:12]} (started {started}) is still running ({holder}), so the "
                         "newest pool is partial; wait for it, or pass --allow-running to select from what is stored now")
    state = "still running" if holder is not None else "marked running but no process holds the store (it was cut off)"
    console.print(f"warning: {kind} run {run_id[:12]} (started {started}) is {state}; the pool holds only what was stored "
                  "before", soft_wrap=True, markup=False)


SELECT_VERB = Verb("select", "select a budgeted slice and export it as training pairs", [
        Option("--db", str, None, "DuckDB file", required=True),
        Option("--budget", str, "1.7%", "a percent (1.7%), a fraction (0.017) or a count (500)"),
        Option("--strategy", str, "cliff", "cliff (top MS), random, full, low-final, plateau, rule", choices=STRATEGIES),
        Option("--seed", int, 0, "seed for random"),
        Option("--out", str, None, "output: a jsonl or parquet file, or a folder for --out-format hf", required=True),
        Option("--out-format", str, "jsonl", "jsonl (training pairs), parquet, or hf (a saved Hugging Face dataset folder)",
               choices=("jsonl", "parquet", "hf")),
        Option("--target", str, "own-reasoning", "own-reasoning (paper recipe) or candidate", choices=("own-reasoning", "candidate")),
        Option("--include-unclosed", None, False, "also select rows whose reasoning hit the length cap (cut off)"),
        Option("--allow-running", None, False, "select even while a scoring run is still writing the store (a partial pool)"),
        Option("--generation-settings", str, None, "the pool scored under these generation settings (a digest or its prefix, "
               "as curate status and score --json show it; default: the most recently scored)"),
        Option("--model-fingerprint", str, None, "which model's scores (default: most recent)"),
        Option("--probe-id", str, None, "which probe's scores (default: most recent)"),
        Option("--model", str, None, "the model directory that scored the pool: its family's format, for a pool whose "
               "store recorded none (a recorded one must agree; no weights are loaded)"),
] + MARKER_OPTIONS, run_select,
    outputs=(Output("--out", folder_when=("out_format", "hf")),), inputs=("--db",))


def run_run(s: Settings) -> int:
    from curation.pipeline.nightly import NightlySettings, reproduce, run_nightly
    from curation.pipeline.score import ScoreSettings
    from curation.pipeline.store import Store
    from probes.refusal import RefusalProbe

    if s["reproduce"]:
        out = s["reproduce_out"] or str(Path(s["reproduce"]).with_name("reproduced_selection.jsonl"))
        result = reproduce(s["reproduce"], out, given_format(s))
        out_console.print(f"{'identical' if result['identical'] else 'DIFFERENT'}: {result['n_selected']} rows -> {out}")
        return 0 if result["identical"] else 1
    sources = s["sources"] if isinstance(s["sources"], list) else [x.strip() for x in (s["sources"] or "").split(",") if x.strip()]
    missing = [flag for flag, key in (("--sources", sources), ("--model", s["model"]), ("--probe", s["probe"]),
                                      ("--db", s["db"]), ("--out", s["out"])) if not key]
    if missing:
        raise ValueError(f"curate run needs {', '.join(missing)} (in the manifest's run section or as flags)")
    cfg = NightlySettings(sources=tuple(str(x) for x in sources), model=s["model"], probe=s["probe"], db=s["db"], out=s["out"],
                          budget=s["budget"], strategy=s["strategy"], seed=s["seed"],
                          score=ScoreSettings(max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"],
                                              chunk_size=s["chunk_size"], judge_answers=s["judge_answers"],
                                              answer_tokens=s["answer_tokens"], judge=single_judge(s, "run")),
                          layout=layout_from(s))
    for source in cfg.sources:
        check_input_file(source, "--sources")
    store = Store(cfg.db)  # the writer lock before the model: a second nightly job is refused at once
    try:
        lm = load_model_from(s)
        probe = RefusalProbe.load_for(s["probe"], lm)
    except BaseException:
        store.close()
        raise
    settings = {k: v for k, v in s.items() if not k.startswith("_")}
    with generation_engine(s, lm, Path(cfg.out)):
        resolved = run_nightly(lm, probe, cfg, thinking_format(s), s["_config"], settings,
                               log=lambda m: console.print(m, soft_wrap=True, markup=False), store=store)
    table = Table(title=f"nightly run: {resolved['selection']['n_selected']} of {resolved['selection']['n_pool']} selected")
    for col in ("source", "candidates", "new", "scored", "already scored", "quarantined", "seconds"):
        table.add_column(col)
    for src, c in resolved["counts"].items():
        table.add_row(src, str(c["candidates"]), str(c["new_examples"]), str(c["scored"]), str(c["already_scored"]),
                      str(c["quarantined"]), str(resolved["durations_s"][f"score {src}"]))
    out_console.print(table)
    out_console.print(f"slice: {resolved['selection']['output']}\nresolved manifest: "
                      f"{Path(resolved['selection']['output']).with_name('resolved_manifest.json')}")
    quarantined = sum(c["quarantined"] for c in resolved["counts"].values())
    return 1 if (s["strict"] and quarantined) else 0


RUN_VERB = Verb("run", "the nightly job from one manifest: score new rows, select, write a resolved manifest", [
        Option("--sources", str, None, "comma-separated candidate jsonl files (a YAML list in a manifest)"),
        Option("--model", str, None, "model directory"),
        Option("--probe", str, None, "probe directory"),
        Option("--db", str, None, "DuckDB file"),
        Option("--out", str, None, "folder for each night's slice and resolved manifest"),
        Option("--budget", str, "1.7%", "selection budget"),
        Option("--strategy", str, "cliff", "selection strategy", choices=STRATEGIES),
        Option("--seed", int, 0, "seed for random strategies"),
        *GENERATION_OPTIONS,
        *GENERATOR_OPTIONS,
        JUDGE_OPTION,
        Option("--batch-size", int, 16, "generation batch size", minimum=1),
        Option("--chunk-size", int, 64, "examples per committed transaction", minimum=1),
        Option("--judge-answers", None, False, "also judge each answer (for --strategy rule)"),
        Option("--strict", None, False, "exit 1 if any row was quarantined (the night still finishes every source)"),
        Option("--reproduce", str, None, "a resolved_manifest.json: re-select that night's slice and compare"),
        Option("--reproduce-out", str, None, "where the re-selected slice goes (default: next to the manifest)"),
] + MODEL_OPTIONS + DATA_OPTIONS, run_run, validates_recipe=True,
    outputs=(Output("--db", appends=True), Output("--out", folder=True, appends=True), Output("--reproduce-out")), inputs=("--sources", "--model", "--probe", "--reproduce"))
