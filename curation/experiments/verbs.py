"""Experiment verbs: the selection sweep, attention heads, the benchmark and the demo."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

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
    console,
    generation_cap,
    layout_from,
    load_model_from,
    out_console,
    single_judge,
    thinking_format,
)
from curation.pipeline.select import STRATEGIES


def run_experiment_selection(s: Settings) -> int:
    from curation.experiments.selection import from_workdir, run_selection_experiment

    overrides: dict[str, Any] = {
        "budgets": tuple(b.strip() for b in s["budgets"].split(",") if b.strip()),
        "strategies": tuple(x.strip() for x in s["strategies"].split(",") if x.strip()),
        "random_seeds": s["random_seeds"],
        "include_full": not s["no_full"],
    }
    bad = sorted(set(overrides["strategies"]) - set(STRATEGIES) | ({"full"} & set(overrides["strategies"])))
    if bad:
        raise ValueError(f"--strategies: {bad} not allowed (choose from {[x for x in STRATEGIES if x != 'full']}; full is always run unless --no-full)")
    batch_size = at_least_one(s, "batch_size")
    exp = from_workdir(s["workdir"], **overrides)
    exp.eval_settings = replace(exp.eval_settings, batch_size=batch_size)
    if s["out"]:
        exp.out = s["out"]
    with stages("selection experiment") as say:
        doc = run_selection_experiment(exp, thinking_format(s), progress=lambda name: say(f"run {name}"))
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


EXPERIMENT_SELECTION_VERB = Verb("experiment selection", "fine-tune on each selection strategy and budget and compare", [
        Option("--workdir", str, "runs/demo", "a curate demo work directory (organism, store, retain set)"),
        Option("--budgets", str, "0.5%,1.7%,5%", "comma-separated budgets"),
        Option("--strategies", str, "cliff,random,low-final,plateau,rule", "comma-separated strategies (full runs once)"),
        Option("--random-seeds", int, 3, "seeds for random and rule", minimum=1),
        Option("--no-full", None, False, "skip the full-data run"),
        Option("--out", str, None, "output folder (default: WORKDIR/experiment_selection)"),
        Option("--batch-size", int, 64, "evaluation batch size", minimum=1),
] + MARKER_OPTIONS, run_experiment_selection,
    outputs=(Output("--out", folder=True, appends=True),), inputs=())


def run_heads(s: Settings) -> int:
    from curation.experiments.heads import HeadsSettings, export_scaled_model, run_heads
    from probes.refusal import RefusalProbe
    from training.prompts import read_prompts

    model_dir = Path(s["model"])
    attribution = read_prompts(s["prompts"] or model_dir / "train_prompts.jsonl", layout_from(s))
    evaluation = read_prompts(s["eval_prompts"] or model_dir / "heldout_prompts.jsonl", layout_from(s))
    ks = tuple(float(k) for k in s["ks"].split(",") if k.strip())
    if not ks or any(not 0 < k <= 100 for k in ks):
        raise ValueError("--ks takes percentages above 0 and at most 100, e.g. 1,3,5")
    if s["export_top"] and not s["export_out"]:
        raise ValueError("--export-top needs --export-out")
    settings = HeadsSettings(ks=ks, gamma=s["gamma"], keep_norm=s["keep_norm"], max_new_tokens=generation_cap(s), judge=single_judge(s, "heads"),
                             batch_size=s["batch_size"], seed=s["seed"])
    lm = load_model_from(s)
    with stages("heads") as say:
        doc = run_heads(lm, RefusalProbe.load_for(s["probe"], lm), attribution, evaluation, thinking_format(s), settings, s["out"],
                    progress=lambda msg: say(f"ablating: {msg}"))
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


HEADS_VERB = Verb("heads", "rank refusal-suppression heads and ablate the top k% against random heads", [
        Option("--model", str, None, "model directory", required=True),
        Option("--probe", str, None, "probe directory", required=True),
        Option("--out", str, None, "output folder (heads.json, heads.html)", required=True),
        Option("--prompts", str, None, "prompts for attribution; harmful rows are used (default MODEL/train_prompts.jsonl)"),
        Option("--eval-prompts", str, None, "prompts for ASR/over-refusal (default MODEL/heldout_prompts.jsonl)"),
        Option("--ks", str, "1,3,5,10", "percentages of all heads to ablate"),
        Option("--gamma", float, 0.0, "scale for ablated heads (0 removes them)"),
        Option("--keep-norm", None, False, "rescale each token's attention output to its original norm"),
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
        Option("--batch-size", int, 16, "batch size", minimum=1),
        Option("--seed", int, 0, "seed for the random-heads control"),
        Option("--export-top", int, None, "also save a model with this many top heads scaled in the weights", minimum=1),
        Option("--export-out", str, None, "where to save that model"),
] + MODEL_OPTIONS + DATA_OPTIONS, run_heads,
    outputs=(Output("--out", folder=True), Output("--export-out", folder=True)), inputs=("--model", "--probe", "--prompts", "--eval-prompts"))


def run_bench(s: Settings) -> int:
    from curation.experiments.bench import run_scoring_bench, run_select_bench
    from probes.files import write_json_atomic

    if s["generator"] == "vllm":
        return _vllm_bench(s)
    if s["stream"]:
        from curation.experiments.stream_bench import run_stream_bench

        stream = run_stream_bench(s["stream_rows"])
        table = Table(title=f"reading a {stream['rows']:,}-row parquet pool ({stream['pool_mb']:.0f} MB), each side in its own process")
        for col in ("", "rows", "rows/s", "peak RSS MB"):
            table.add_column(col, justify="right")
        for name, key in (("reader, whole pool", "stream"), ("reader, first tenth", "stream_tenth"), ("load whole (baseline)", "whole_load")):
            r = stream[key]
            table.add_row(name, f"{r['rows']:,}", f"{r['rows_per_s']:,.0f}", f"{r['peak_rss_mb']:.0f}")
        table.add_row("peak: whole pool / first tenth", "", "", f"{stream['ratio_peak_full_over_tenth']:.2f}x")
        table.add_row("peak: reader / load whole", "", "", f"{stream['ratio_peak_stream_over_whole_load']:.2f}x")
        out_console.print(table)
        if s["out"]:
            write_json_atomic(s["out"], {"stream": stream})
        return 0
    if s["reprobe"]:
        from curation.experiments.reprobe_bench import run_reprobe_bench

        model_dir = Path(s["model"])
        with stages("re-probe bench") as say:
            say("organism, then a random-weight model with Qwen3's 151,936-token vocabulary")
            both = run_reprobe_bench(model_dir, s["probe"], s["prompts"] or model_dir / "train_prompts.jsonl", n=s["n"],
                                     max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"])
        table = Table(title=f"stored generations: {s['n']} prompts, {s['max_new_tokens']} new tokens, batch {s['batch_size']}")
        for col in ("model", "params", "generate s", "score s", "re-probe s", "re-probe", "score/gen", "probe/bare"):
            table.add_column(col, justify="right")
        for name, r in both.items():
            sec, ratio = r["seconds"], r["ratios"]
            table.add_row(name, f"{r['parameters'] / 1e6:.1f}M", f"{sec['plain_generate']:.2f}", f"{sec['full_scoring']:.2f}",
                          f"{sec['reprobe']:.3f}", f"{ratio['reprobe_speedup']:.1f}x",
                          f"{ratio['full_scoring_over_plain_generate']:.2f}x", f"{ratio['probe_pass_throughput_over_bare_forward']:.2f}x")
        out_console.print(table)
        out_console.print("targets: re-probe >= 20x (realistic model), full scoring <= 1.25x plain generate, "
                          "probe pass >= 0.8x bare forward", highlight=False)
        if s["out"]:
            write_json_atomic(s["out"], {"reprobe": both})
        return 0
    if s["store"]:
        from curation.experiments.bench import run_store_bench

        with stages("store bench") as say:
            rows = s["rows"] or 1_000_000
            say(f"filling {rows:,} scored rows with {s['trace_tokens']}-token traces")
            result = run_store_bench(rows, s["trace_tokens"], s["budget"])
        table = Table(title=f"a store of {result['rows']:,} scored examples, {result['trace_tokens']}-token traces, "
                            f"{result['reasoning_chars']:,} characters of reasoning each")
        for col in ("size on disk", "bytes per row", f"select --budget {s['budget']} (fresh open)", "curate status", "filled in"):
            table.add_column(col, justify="right")
        table.add_row(f"{result['size_bytes'] / 2**30:.2f} GiB", f"{result['bytes_per_row']:,.0f}", f"{result['select_seconds']:.2f} s",
                      f"{result['status_seconds']:.2f} s", f"{result['fill_seconds']:.0f} s")
        out_console.print(table)
        if s["out"]:
            write_json_atomic(s["out"], {"store": result})
        return 0
    if s["select"]:
        result = run_select_bench(s["rows"] or 10_000_000, s["budget"])
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


def _vllm_bench(s: Settings) -> int:
    from curation.experiments.vllm_bench import print_vllm_bench, run_vllm_bench
    from probes.files import write_json_atomic

    model_dir = Path(s["model"])
    with stages("vLLM bench") as say:
        r = run_vllm_bench(str(model_dir), s["probe"], s["prompts"] or str(model_dir / "train_prompts.jsonl"), n=s["n"],
                           max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"], url=s["generator_url"],
                           log_dir=Path(s["out"]).parent if s["out"] else model_dir.parent, say=say)
    print_vllm_bench(r, out_console)
    if s["out"]:
        write_json_atomic(s["out"], {"vllm": r})
    return 0


BENCH_VERB = Verb("bench", "time the scoring engine against a naive baseline (or, with --select, selection at scale)", [
        Option("--model", str, "runs/demo/organism", "model directory"),
        Option("--probe", str, "runs/demo/probe", "probe directory"),
        Option("--prompts", str, None, "prompts to score (default MODEL/train_prompts.jsonl)"),
        Option("--n", int, 64, "examples per side", minimum=1),
        Option("--max-new-tokens", int, 128, "reasoning length cap", minimum=1),
        Option("--batch-size", int, 16, "engine batch size", minimum=1),
        Option("--tolerance", float, 1e-3, "largest allowed score difference"),
        Option("--select", None, False, "benchmark selection instead of scoring"),
        Option("--store", None, False, "benchmark a large store: size on disk, selection and status times (--rows, --trace-tokens)"),
        Option("--trace-tokens", int, 1000, "trace length per row for --store", minimum=1),
        Option("--reprobe", None, False, "benchmark scoring a second probe from stored generations against generating "
               "(organism and a random model with a real vocabulary)"),
        Option("--rows", int, None, "score rows for --select (default 10,000,000) or --store (default 1,000,000)", minimum=1),
        Option("--stream", None, False, "benchmark reading a large parquet pool (peak memory) instead of scoring"),
        Option("--stream-rows", int, 1_000_000, "pool rows for --stream", minimum=10),
        Option("--budget", str, "1.7%", "budget for --select"),
        Option("--out", str, None, "write the figures as JSON"),
        Option("--device", str, "auto", "cpu, cuda or auto"),
        Option("--dtype", str, "auto", "auto, float32, bfloat16"),
        Option("--generator", str, "hf", "vllm: benchmark generation through a vLLM server against HF generate "
               "(tokens/s, the probe pass's share, greedy parity)", choices=("hf", "vllm")),
        Option("--generator-url", str, None, "with --generator vllm: a running server (default: start one from make engine's)"),
], run_bench,
    outputs=(Output("--out"),), inputs=("--model", "--probe", "--prompts"))


def run_demo(s: Settings) -> int:
    from curation.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=s["workdir"], size=s["size"], moe=s["moe"], seed=s["seed"], budget=s["budget"],
                     strategy=s["strategy"], rebuild=s["rebuild"])
    run_demo(cfg, console=out_console)
    return 0


DEMO_VERB = Verb("demo", "run the whole pipeline on the bundled model organism", [
        Option("--workdir", str, "runs/demo", "work directory"),
        Option("--size", str, "demo", "organism size", choices=("test", "demo")),
        Option("--moe", None, False, "use the MoE organism"),
        Option("--seed", int, 0, "seed"),
        Option("--budget", str, "1.7%", "selection budget"),
        Option("--strategy", str, "cliff", "selection strategy", choices=("cliff", "random", "full")),
        Option("--rebuild", None, False, "rebuild the organism even if one is there"),
], run_demo,
    outputs=(Output("--workdir", folder=True, appends=True),), inputs=())
