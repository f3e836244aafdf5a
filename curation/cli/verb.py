"""One verb of the ``curate`` command: its name, help, options and the job it runs.

Each room of ``curation`` declares its verbs next to the jobs they run, one
``Verb`` per verb; ``curation.cli.registry`` collects them, the parser and the
recipe validator both read that registry. This module also holds the option
groups and helpers that many verbs share (model loading flags, thinking
markers, the consoles), so that no verb restates them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from curation.cli.options import Option

if TYPE_CHECKING:
    from probes.chat import ThinkingFormat
    from probes.layouts import Layout
    from probes.models import LoadedModel, Sampling

# Messages and progress go to stderr; results to stdout, so that `curate ... > file` keeps only results.
console = Console(stderr=True)
out_console = Console()

Settings = dict[str, Any]


FORCE_OPTION = Option("--force", None, False, "overwrite an output that curate did not write (never one of the inputs)")


@dataclass(frozen=True)
class Output:
    """An option naming something the verb writes."""

    flag: str
    folder: bool = False
    # A folder only under one setting, e.g. ("out_format", "hf"): select writes a file or a saved dataset.
    folder_when: tuple[str, str] | None = None
    # Added to rather than replaced (a store, a shard folder, a folder of nights): only checked
    # against the inputs and for its kind, never refused for existing.
    appends: bool = False


@dataclass(frozen=True)
class Verb:
    name: str  # "score" or a two-word group verb, "probe train"
    help: str
    options: Sequence[Option]
    run: Callable[[Settings], int]
    # The verb reads a whole recipe (curate run MANIFEST): the dispatcher validates the --config file
    # against every verb's options before the job starts.
    validates_recipe: bool = False
    # What it writes and what it reads: the dispatcher refuses an output that is an input, or that
    # exists and is not curate's (without --force), before the job starts; see probes.outputs.
    outputs: tuple[Output, ...] = ()
    inputs: tuple[str, ...] = ()

    def output_is_folder(self, output: Output, s: Settings) -> bool:
        return output.folder or (output.folder_when is not None and s.get(output.folder_when[0]) == output.folder_when[1])

    @property
    def cli_options(self) -> list[Option]:
        """The declared options, plus --force for a verb that replaces outputs."""
        replaces = any(not o.appends for o in self.outputs)
        return [*self.options, FORCE_OPTION] if replaces else list(self.options)

    @property
    def section(self) -> str:
        """The recipe section that holds this verb's keys (``probe train`` -> ``probe_train``)."""
        return self.name.replace(" ", "_")


def json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


DATA_OPTIONS = [
    Option("--format", str, None, "column layout preset: wildjailbreak (adversarial else vanilla, completion, data_type), "
           "reasoning (instruction/question, reasoning, response: STAR-1 and SafeChain style) or messages (a chat list)",
           choices=("wildjailbreak", "reasoning", "messages")),
    Option("--map", str, None, "FIELD=COLUMN pairs over the format, e.g. prompt=adversarial,response=completion,category=data_type"),
    Option("--where", str, None, "keep only rows whose COLUMN holds one of the values, e.g. data_type=vanilla_harmful,adversarial_harmful; "
           "conditions joined by ';', != to exclude"),
]
MARKER_OPTIONS = [
    Option("--think-open", str, None, "marker that opens the reasoning (default: the model family's, e.g. <think>; "
           "gpt-oss: the harmony analysis channel)"),
    Option("--think-close", str, None, "marker that closes the reasoning (default: the model family's)"),
    Option("--system-prompt", str, None, "system message put before every prompt (e.g. the one a model card asks for)"),
]
MODEL_OPTIONS = [
    Option("--device", str, "auto", "cpu, cuda, cuda:1 or auto"),
    Option("--device-map", str, None, "spread the model over devices while loading (e.g. auto across GPUs; needs accelerate); "
           "overrides --device"),
    Option("--dtype", str, "auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"),
    Option("--attn-implementation", str, None, "attention kernel: eager, sdpa, flash_attention_2 (default: transformers' choice)"),
    Option("--trust-remote-code", None, False, "allow a checkpoint's own Python code to run (off unless asked)"),
    *MARKER_OPTIONS,
    Option("--chat-template-kwargs", json_object, None, 'JSON object passed to the chat template, e.g. \'{"enable_thinking": true}\' '
           "(default: the model family's)"),
]
SAMPLING_OPTIONS = [
    Option("--temperature", float, 0.0, "sampling temperature; 0 decodes greedily (R1 distills and Qwen3 ask for 0.6)"),
    Option("--top-p", float, 1.0, "nucleus sampling mass (R1 distills and Qwen3 ask for 0.95)"),
    Option("--top-k", int, 0, "sample among the k likeliest tokens only; 0 turns it off (Qwen3 asks for 20)", minimum=0),
    Option("--sampling-seed", int, 0, "sampling seed (each generation batch is seeded from it and its place, so reruns repeat)"),
]
# One reasoning budget and one answer budget for every stage that generates: a recipe sets
# them once at its top level, and a stage that reads answers generates up to their sum.
GENERATION_OPTIONS = [
    Option("--max-new-tokens", int, 2048, "reasoning budget in tokens (the same for every stage; real reasoning models "
           "often need 2-8k)", minimum=1),
    Option("--answer-tokens", int, 512, "answer budget after the reasoning closes, for stages that read the answer", minimum=1),
    *SAMPLING_OPTIONS,
]


def _judge_spec(text: str) -> str:
    from training.judges import judge_spec  # no torch: the rule judges and the cards are plain Python

    return judge_spec(text)


JUDGE_OPTION = Option("--judge", _judge_spec, ["relevance"], "who reads the model's final answers: relevance (does the "
                      "answer deliver the request? four outcomes, a packaged sentence encoder), context (rules that read the request "
                      "too), substring (stock refusal phrases), auto (a refusal classifier found under $CURATE_JUDGE_MODELS, "
                      "else relevance), or a local classifier model as NAME=DIR with NAME one of "
                      "qwen3guard, wildguard, llama-guard, harmbench-cls (docs/judges.md)", repeat=True)


def single_judge(s: Settings, verb: str) -> str:
    """The one judge a verb that labels or filters by verdicts uses; only ``evaluate`` compares several."""
    judges = s["judge"]
    if len(judges) != 1:
        raise ValueError(f"curate {verb} takes one --judge (got {len(judges)}: {', '.join(judges)}); "
                         "curate evaluate compares several side by side")
    return str(judges[0])


def generation_cap(s: Settings) -> int:
    """Tokens a stage that reads the answer may generate: reasoning budget plus answer budget."""
    return int(s["max_new_tokens"]) + int(s["answer_tokens"])


def warn_unclosed(stage: str, unclosed: int, total: int, limit: float = 0.2) -> None:
    """Say so when more than ``limit`` of a stage's traces never closed their reasoning:
    its rates then rest on few answers, and the reasoning budget is likely too small."""
    if total and unclosed / total > limit:
        console.print(f"[yellow]warning:[/] {stage}: {unclosed}/{total} traces ({100 * unclosed / total:.0f}%) did not close "
                      f"their reasoning within --max-new-tokens; rates use closed answers only. Raise --max-new-tokens.",
                      highlight=False, soft_wrap=True)


def _family_format(s: Settings) -> ThinkingFormat:
    """The thinking format of the model's family, when --model names a directory of a supported one."""
    from probes.chat import ThinkingFormat
    from probes.families import UnsupportedModelError, family_for_dir

    model = s.get("model")
    if not model:
        return ThinkingFormat()
    try:
        return family_for_dir(model).thinking
    except (UnsupportedModelError, FileNotFoundError, ValueError):
        return ThinkingFormat()  # the load that follows gives the error, with its own context


def thinking_format(s: Settings) -> ThinkingFormat:
    """Flags over the model family's format (markers, separators and template arguments)."""
    from dataclasses import replace

    base = _family_format(s)
    changes: dict[str, Any] = {}
    if s.get("think_open"):
        changes["open_marker"] = s["think_open"]
    if s.get("think_close"):
        changes["close_marker"] = s["think_close"]
    if s.get("chat_template_kwargs") is not None:
        changes["template_kwargs"] = dict(s["chat_template_kwargs"])
    if s.get("system_prompt"):
        changes["system_prompt"] = s["system_prompt"]
    return replace(base, **changes)


def sampling_from(s: Settings) -> Sampling:
    from probes.models import Sampling

    return Sampling(temperature=s.get("temperature") or 0.0, top_p=s.get("top_p") or 1.0, top_k=s.get("top_k") or 0,
                    seed=s.get("sampling_seed") or 0)


def layout_from(s: Settings) -> Layout:
    """How the verb's input rows map to the canonical fields (--format, --map, --where)."""
    from probes.layouts import Layout

    return Layout.from_flags(s.get("format"), s.get("map"), s.get("where"), thinking_format(s).close_marker)


def load_model_from(s: Settings, adapter: str | None = None) -> LoadedModel:
    from probes.models import load_model

    lm = load_model(s["model"], adapter=adapter, device=s["device"], dtype=s["dtype"], trust_remote_code=s["trust_remote_code"],
                    device_map=s.get("device_map"), attn_implementation=s.get("attn_implementation"))
    if "temperature" in s:
        lm.sampling = sampling_from(s)
    return lm


def at_least_one(s: Settings, name: str) -> int:
    if s[name] < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {s[name]})")
    return int(s[name])


def comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def check_input_file(path: str | None, flag: str) -> None:
    """A data input (a file, a folder of files, a glob or a saved dataset) that must hold
    something to read: said before any store is opened or model loaded."""
    if path is None:
        return
    from probes.rows import expand

    expand(path, flag)
