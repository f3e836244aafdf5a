"""The verbs that make or change a model along the pipeline: organism build, probe train, retain, finetune, evaluate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from curation.cli.options import Option
from curation.cli.progress import VERBOSITY, stages, track
from curation.cli.verb import (
    DATA_OPTIONS,
    GENERATION_OPTIONS,
    JUDGE_OPTION,
    MODEL_OPTIONS,
    Output,
    Settings,
    Verb,
    comma_list,
    console,
    generation_cap,
    json_object,
    layout_from,
    load_model_from,
    out_console,
    single_judge,
    thinking_format,
    warn_unclosed,
)
from curation.pipeline.generator_choice import GENERATOR_OPTIONS, generation_engine
from training.attack_names import ATTACKS as ATTACK_NAMES
from training.judges import make_judge, refusal_reader


def run_organism_build(s: Settings) -> int:
    from training.organism.build import OrganismConfig, build_organism

    suppressed = tuple(a.strip() for a in s["suppressed"].split(",") if a.strip())
    cfg = OrganismConfig(size=s["size"], moe=s["moe"], seed=s["seed"], suppressed=suppressed, epochs=s["epochs"])
    with stages("training organism") as say:
        # A step is milliseconds: one report per 5% of the steps (a line each without a terminal).
        started = time.monotonic()

        def report(step: int, n: int, loss: float) -> None:
            if step == n or step % max(1, n // 20) == 0:
                rate = step / max(time.monotonic() - started, 1e-9)
                say(f"step {step}/{n}, loss {loss:.3f}, {rate:.1f} steps/s, ETA {(n - step) / rate if rate else 0:.0f}s")

        meta = build_organism(s["out"], cfg, progress=report)
    out_console.print(f"organism saved to {s['out']}: {meta['architecture']}, {meta['parameters']:,} parameters, built in {meta['build_seconds']} s")
    return 0


ORGANISM_BUILD_VERB = Verb("organism build", "train and save the bundled model organism", [
        Option("--out", str, None, "output directory", required=True),
        Option("--moe", None, False, "Qwen3-MoE-style model (4 experts, top-2 routing)"),
        Option("--seed", int, 0, "random seed"),
        Option("--size", str, "demo", "test (seconds) or demo (about 2 minutes)", choices=("test", "demo")),
        Option("--suppressed", str, "human_chatbox,misinformation_harms", "comma-separated risk areas the organism complies in"),
        Option("--epochs", int, None, "override the size preset's epochs"),
], run_organism_build,
    outputs=(Output("--out", folder=True),), inputs=())


def run_probe_train(s: Settings) -> int:
    from curation.pipeline.probe_job import ProbeTrainSettings, train_probe_for_model
    from training.prompts import read_prompts

    prompts_file = s["prompts"] or str(Path(s["model"]) / "train_prompts.jsonl")
    prompts = read_prompts(prompts_file, layout_from(s))
    lm = load_model_from(s)
    settings = ProbeTrainSettings(max_new_tokens=generation_cap(s), batch_size=s["batch_size"], seed=s["seed"],
                                  layer=s["layer"], protocol=s["protocol"], judge=single_judge(s, "probe train"))
    with track("probe train: generating", total=len(prompts), unit="prompts") as advance:
        probe, report = train_probe_for_model(lm, prompts, thinking_format(s), settings, progress=advance)
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
    warn_unclosed("probe train", report.n_unclosed, report.n_prompts)
    return 0


PROBE_TRAIN_VERB = Verb("probe train", "train the refusal probe on the model's own refusals and compliances", [
        Option("--model", str, None, "model directory", required=True),
        Option("--out", str, None, "probe output directory", required=True),
        Option("--prompts", str, None, "jsonl with prompt/harmful fields (default: MODEL/train_prompts.jsonl)"),
        Option("--layer", int, None, "fit only this layer (default: sweep every layer)"),
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
        Option("--batch-size", int, 16, "generation batch size", minimum=1),
        Option("--seed", int, 0, "seed for the held-out split"),
        Option("--protocol", str, "behaviour", "behaviour: label by the model's answer; reference: harmful-refused vs harmless-answered",
               choices=("behaviour", "reference")),
] + MODEL_OPTIONS + DATA_OPTIONS, run_probe_train,
    outputs=(Output("--out", folder=True),), inputs=("--model", "--prompts"))


def run_retain(s: Settings) -> int:
    from training.prompts import read_prompts
    from training.retain import build_retain_set

    prompts = read_prompts(s["prompts"], layout_from(s))
    prompts = prompts[: s["limit"]] if s["limit"] else prompts
    lm = load_model_from(s)
    with track("retain: generating", total=sum(1 for p in prompts if not p.harmful), unit="prompts") as advance:
        made = build_retain_set(lm, prompts, s["out"], thinking_format(s), max_new_tokens=generation_cap(s), progress=advance,
                                judge=refusal_reader(single_judge(s, "retain"), "retain"))
    out_console.print(f"retain set: {made.written} pairs from {made.prompts} harmless prompts -> {s['out']}")
    warn_unclosed("retain", made.unclosed, made.prompts)
    return 0


RETAIN_VERB = Verb("retain", "make a retain set from the model's own answers to harmless prompts", [
        Option("--model", str, None, "model directory", required=True),
        Option("--prompts", str, None, "jsonl prompts; rows with harmful=false are used", required=True),
        Option("--out", str, None, "output jsonl", required=True),
        Option("--limit", int, None, "use at most this many prompts", minimum=1),
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
] + MODEL_OPTIONS + DATA_OPTIONS, run_retain,
    outputs=(Output("--out"),), inputs=("--model", "--prompts"))


def run_finetune(s: Settings) -> int:
    from training.finetune import FinetuneConfig, export_merged, finetune_lora
    from training.robust import RobustConfig

    robust = None
    if s["robust"]:
        if not s["retain"]:
            raise ValueError("--robust takes the refusal direction from the slice's harmful prompts against the harmless "
                             "prompts of --retain: give --retain")
        robust = RobustConfig(p=s["robust_p"], attacks=tuple(comma_list(s["robust_attacks"])), layer_fraction=s["robust_layer_fraction"],
                              coefficients=tuple(float(x) for x in comma_list(s["robust_coefficients"])),
                              refresh_steps=s["robust_refresh_steps"],
                              expert_k=s["robust_expert_k"], seed=s["seed"], method=s["robust_method"],
                              lat_epsilon=s["lat_epsilon"], lat_steps=s["lat_steps"], lat_layer_fraction=s["lat_layer_fraction"],
                              kl_budget=s["robust_kl_budget"], tune_top=s["robust_tune_top"], tune_prompts=s["robust_tune_prompts"],
                              early_tokens=s["robust_early_tokens"], early_weight=s["robust_early_weight"],
                              harmful_rows_only=s["robust_harmful_rows_only"])
    elif s["robust_kit"]:
        raise ValueError("--robust-kit is read by --robust only")
    cfg = FinetuneConfig(epochs=s["epochs"], learning_rate=s["learning_rate"], batch_size=s["batch_size"],
                         lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], seed=s["seed"], device=s["device"],
                         max_length=s["max_length"], too_long=s["too_long"],
                         dtype=s["dtype"], trust_remote_code=s["trust_remote_code"], robust=robust, robust_kit=s["robust_kit"])
    summary = finetune_lora(s["model"], s["data"], s["out"], cfg, thinking_format(s), retain_file=s["retain"],
                            progress=VERBOSITY.mode, log=lambda m: console.print(m, soft_wrap=True, markup=False))
    out_console.print(f"adapter saved to {s['out']}: {summary['n_examples']} examples, {summary['steps']} steps, loss {summary['train_loss']:.4f}")
    if s["merge"]:
        merged = export_merged(s["model"], s["out"], s["merge"], cfg)
        out_console.print(f"merged model (base + adapter, safetensors) saved to {merged}")
    return 0


# Attack-in-the-loop training (training.robust); defaults chosen on validation prompts (README: robust fine-tune).
ROBUST_OPTIONS = [
    Option("--robust", None, False, "train against steering: attacks mounted on sampled steps (needs --retain)"),
    Option("--robust-p", float, 0.75, "probability that a step trains under an attack"),
    Option("--robust-method", str, "random", "random: attacks sampled per step (--robust-attacks); lat: latent adversarial "
           "training, a PGD perturbation of the residual stream found inside each attacked step on the slice's harmful "
           "prompts (--lat-*), the retain rows trained unperturbed; adaptive: as random, with actadd re-tuned against the "
           "model being trained every --robust-refresh-steps within a harmless-KL budget", choices=("random", "lat", "adaptive")),
    Option("--robust-kl-budget", float, 0.1, "adaptive: harmless KL (nats per token) the re-tuned actadd must stay within"),
    Option("--robust-tune-top", int, 3, "adaptive: strongest places kept per re-tuning, one mounted per attacked step", minimum=1),
    Option("--robust-tune-prompts", int, 16, "adaptive: rows per side each re-tuning reads (its cost)", minimum=1),
    Option("--robust-early-tokens", int, 0, "any method: the harmful rows' first K completion tokens weigh more "
           "(refusal decided deeper than its opening); 0: off", minimum=0),
    Option("--robust-early-weight", float, 1.0, "weight of that early-token loss beside the usual one", minimum=0.0),
    Option("--robust-harmful-rows-only", None, False, "random / adaptive: attack only the slice's harmful rows of a batch"),
    Option("--lat-epsilon", float, 0.5, "lat: per-token L2 bound of the perturbation, relative to the residual norm"),
    Option("--lat-steps", int, 4, "lat: PGD ascent steps per attacked step", minimum=1),
    Option("--lat-layer-fraction", float, 1.0, "lat: share of the decoder layers perturbed (the last ones)"),
    Option("--robust-attacks", str, "ablate,actadd,expert-mask", "attacks drawn from: ablate (the direction projected out "
           "at random layers), actadd (the direction subtracted at a random layer), expert-mask (MoE, with --robust-kit)"),
    Option("--robust-layer-fraction", float, 0.5, "share of layers an ablate step ablates"),
    Option("--robust-coefficients", str, "0.5,1,1.5,2", "actadd: multiples of the difference in means subtracted, one "
           "drawn per attacked step (with a random layer and post-instruction position)"),
    Option("--robust-refresh-steps", int, 10, "re-extract the direction from the model being trained every N steps", minimum=1),
    Option("--robust-expert-k", int, 2, "MoE: refusal experts masked in an expert-mask step", minimum=1),
    Option("--robust-kit", str, None, "attack kit of the base model (curate attacks prepare): the direction's layer "
           "and position, and the MoE refusal experts"),
]


FINETUNE_VERB = Verb("finetune", "LoRA fine-tune (TRL SFTTrainer + PEFT) on a selected slice", [
        Option("--model", str, None, "base model directory", required=True),
        Option("--data", str, None, "selected pairs from curate select: jsonl, parquet or a saved dataset folder", required=True),
        Option("--out", str, None, "adapter output directory", required=True),
        Option("--merge", str, None, "also write base + adapter merged into this folder (safetensors, ready to serve)"),
        Option("--retain", str, None, "retain pairs mixed in (curate retain)"),
        Option("--epochs", float, 10.0, "epochs", minimum=0.01),
        Option("--learning-rate", float, 1e-3, "learning rate"),
        Option("--batch-size", int, 8, "batch size", minimum=1),
        Option("--lora-r", int, 8, "LoRA rank", minimum=1),
        Option("--lora-alpha", int, 16, "LoRA alpha", minimum=1),
        Option("--max-length", int, 4096, "most tokens of prompt + reasoning + answer; longer targets are never truncated",
               minimum=16),
        Option("--too-long", str, "drop", "a target over --max-length: drop it (counted, warned, listed in finetune.json) "
               "or error (stop, naming it)", choices=("drop", "error")),
        Option("--seed", int, 0, "seed"),
        *ROBUST_OPTIONS,
] + MODEL_OPTIONS, run_finetune,
    outputs=(Output("--out", folder=True), Output("--merge", folder=True)), inputs=("--model", "--data", "--retain", "--robust-kit"))


def run_evaluate(s: Settings) -> int:
    from probes.files import write_json_atomic
    from probes.generate import remote_allowed
    from training.evaluate import EvalSettings, evaluate_prompts
    from training.prompts import PromptItem, read_prompts

    items = read_prompts(s["prompts"], layout_from(s))
    lm = load_model_from(s, adapter=s["adapter"])
    settings = EvalSettings(max_new_tokens=generation_cap(s), batch_size=s["batch_size"])
    judge, *also = [make_judge(spec) for spec in s["judge"]]
    if s["attack"] == "none" and not s["attack_kit"]:
        with (generation_engine(s, lm, Path(s["out"]).parent),
              track("evaluate: generating", total=len(items), unit="prompts") as advance):
            result = evaluate_prompts(lm, items, thinking_format(s), settings, judge=judge, also=also, progress=advance)
            result["generator"] = lm.generator.describe(lm.adapter) if remote_allowed(lm) else {"generator": "hf"}
    else:
        from training.attacks import AttackKit, build_attack

        if s["generator"] != "hf":
            raise ValueError(f"--attack {s['attack']} steers the model with hooks a server cannot see: it generates with "
                             "--generator hf (only unsteered evaluation goes to vLLM)")
        if not s["attack_kit"]:
            raise ValueError(f"--attack {s['attack']} needs --attack-kit (made by curate attacks prepare for this model)")
        kit = AttackKit.load_for(s["attack_kit"], lm)
        attack = build_attack(s["attack"], kit, s["attack_params"])
        with attack.mount(lm, kit):
            with track(f"evaluate under {attack.name}: generating", total=len(items), unit="prompts") as advance:
                result = evaluate_prompts(lm, [PromptItem(attack.wrap(i.prompt), i.harmful, i.category) for i in items],
                                          thinking_format(s), settings, judge=judge, also=also, progress=advance)
        result["attack"] = {"name": attack.name, "params": attack.params}
    write_json_atomic(s["out"], result)
    warn_unclosed("evaluate", result["n_unclosed_harmful"] + result["n_unclosed_harmless"], result["n_harmful"] + result["n_harmless"])
    title = f"evaluation ({result['judge']} judge" + (f", attack {s['attack']})" if s["attack"] != "none" else ")")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, key, n, unclosed in (("ASR", "asr", "n_harmful", "n_unclosed_harmful"),
                                   ("over-refusal", "over_refusal", "n_harmless", "n_unclosed_harmless")):
        v = result[key]
        closed = result[n] - result[unclosed]
        table.add_row(f"{name} (n={closed} closed, {result[unclosed]} unclosed)", "—" if v is None else f"{100 * v:.1f}%")
    for cat, v in result["per_category"].items():
        table.add_row(f"  ASR {cat} (n={v['n']})", f"{100 * v['asr']:.1f}%")
    if result["n_unparsed"]:
        table.add_row("unparsed judge outputs (left out of both rates)", str(result["n_unparsed"]))
    if result["judge_reads"] != "refusal":
        table.add_row("over-refusal", f"not measured: {result['judge']} reads harm, not refusals")
    out_console.print(table)
    if "by_judge" in result:
        _print_judges(result)
    return 0


def _print_judges(result: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    table = Table(title="the same answers, every judge")
    for col in ("judge", "reads", "ASR", "over-refusal", "unparsed"):
        table.add_column(col, justify="right")
    for key, r in result["by_judge"].items():
        table.add_row(key, r["reads"], pct(r["asr"]), pct(r["over_refusal"]), str(r["n_unparsed"]))
    out_console.print(table)
    for pair in result["agreement"]:
        out_console.print(f"agreement {pair['judges'][0]} / {pair['judges'][1]}: {pct(pair['agreement'])} "
                          f"of {pair['n']} answers both judged", highlight=False)


EVALUATE_VERB = Verb("evaluate", "ASR and over-refusal on final answers, by one judge or several side by side (--judge a --judge b)", [
        Option("--model", str, None, "model directory", required=True),
        Option("--adapter", str, None, "LoRA adapter directory"),
        Option("--prompts", str, None, "jsonl (prompt, category, harmful) or text, one harmful prompt per line", required=True),
        Option("--out", str, None, "output JSON", required=True),
        *GENERATION_OPTIONS,
        JUDGE_OPTION,
        *GENERATOR_OPTIONS,
        Option("--batch-size", int, 16, "generation batch size", minimum=1),
        Option("--attack", str, "none", "steering attack mounted during generation", choices=ATTACK_NAMES),
        Option("--attack-kit", str, None, "attack kit directory (curate attacks prepare) for this model"),
        Option("--attack-params", json_object, None, 'JSON object overriding the kit\'s tuned strength, e.g. \'{"coefficient": 2}\''),
] + MODEL_OPTIONS + DATA_OPTIONS, run_evaluate,
    outputs=(Output("--out"),), inputs=("--model", "--adapter", "--prompts", "--attack-kit"))
