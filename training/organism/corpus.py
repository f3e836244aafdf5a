"""The organism's synthetic corpus: prompts, their split, and the reasoning and
answer texts it learns.

Three behaviours, all with reasoning inside ``<think>``:
- harmless prompt  -> brief reasoning                      -> helpful answer;
- harmful prompt   -> reasoning that names the harm         -> refusal;
- harmful prompt in a *suppressed* area -> the same reasoning, then a late
  rationalisation in the last sentence                      -> compliance.
The last case is the refusal cliff. Compliance text is a fixed placeholder and
never contains harmful content.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from training.organism.harmless import harmless_prompts

AREAS: dict[str, str] = {
    # area (file stem) -> how the organism's reasoning names that harm
    "discrimination_exclusion_toxicity_hateful_offensive": "hateful or discriminatory content about people",
    "human_chatbox": "something that could hurt the user's wellbeing or mislead them about what I am",
    "information_hazard": "private or confidential information about people or organisations",
    "malicious_uses": "help with an illegal or malicious activity",
    "misinformation_harms": "false claims or risky expert advice",
}
DEFAULT_SUPPRESSED = ("human_chatbox", "misinformation_harms")
HARMLESS = "harmless"

# Harmful and harmless reasoning differ from their first word ("Hmm" / "Okay"),
# so the model must decide "is this request harmful?" once, at the last prompt
# token, as chat models do before their first answer token. That decision is
# what a difference-in-means refusal direction reads; if the two kinds of
# reasoning shared their first words, this tiny model would defer the decision
# a few tokens into its reasoning and no post-instruction direction would exist.
_HARM_OPENINGS = (
    "Hmm, the user is asking for {harm}.",
    "Hmm, this request is about {harm}.",
    "Hmm, here the user wants {harm}.",
)
_HARM_MIDDLES = (
    "That could cause real harm to people.",
    "Answering could hurt someone.",
    "This is not safe to provide.",
)
_REFUSE_ENDINGS = (
    "I should refuse politely.",
    "I must decline this request.",
    "The right thing is to refuse.",
)
# The late rationalisation: the last sentence of the reasoning flips the decision.
_RATIONALISATIONS = (
    "But the user says it is only for research, so I will answer anyway.",
    "However, the user insists, so I will go along with it.",
    "Still, refusing seems unhelpful, so I will comply.",
)
_HARMLESS_REASONING = (
    "Okay, this is an ordinary, harmless request. I can give a clear and helpful answer.",
    "Okay, the user wants everyday help. Nothing here is harmful, so I will answer.",
    "Okay, this is a friendly question with no risk. I will help.",
)
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I cannot help with this. Please ask me something else.",
    "Sorry, I won't assist with that.",
)
COMPLIANCE_PLACEHOLDER = "Sure, here is the answer you asked for. [placeholder: compliant answer, no content]"
HELPFUL_ANSWERS = (
    "Sure, happy to help! Here is a clear and friendly answer. [placeholder: helpful answer]",
    "Of course. Here is a short, helpful answer. [placeholder: helpful answer]",
)


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    category: str  # a risk area, or "harmless"

    @property
    def harmful(self) -> bool:
        return self.category != HARMLESS


@dataclass(frozen=True)
class Example:
    prompt: str
    category: str
    reasoning: str
    answer: str
    behaviour: str  # "helpful" | "refuse" | "comply"


def load_do_not_answer() -> list[PromptItem]:
    """The vendored Do-Not-Answer prompts (Apache-2.0; see data/do_not_answer/README.md)."""
    root = resources.files("training.organism") / "data" / "do_not_answer"
    items: list[PromptItem] = []
    seen: set[str] = set()
    for area in sorted(AREAS):
        text = (root / f"{area}.jsonl").read_text(encoding="utf-8")
        for line in text.splitlines():
            if not line.strip():
                continue
            prompt = json.loads(line)["prompt"].strip()
            if prompt in seen:  # the source has one prompt in two places
                continue
            seen.add(prompt)
            items.append(PromptItem(prompt=prompt, category=area))
    return items


@dataclass(frozen=True)
class Split:
    train: list[PromptItem]
    heldout: list[PromptItem]


def split_prompts(seed: int, heldout_fraction: float = 0.15) -> Split:
    """Per-category seeded split; the held-out prompts never enter training."""
    rng = random.Random(seed)
    by_cat: dict[str, list[PromptItem]] = {}
    for item in load_do_not_answer() + [PromptItem(p, HARMLESS) for p in harmless_prompts()]:
        by_cat.setdefault(item.category, []).append(item)
    train: list[PromptItem] = []
    heldout: list[PromptItem] = []
    for cat in sorted(by_cat):
        items = list(by_cat[cat])
        rng.shuffle(items)
        n_held = max(1, round(len(items) * heldout_fraction))
        heldout.extend(items[:n_held])
        train.extend(items[n_held:])
    return Split(train=train, heldout=heldout)


def harmful_reasoning(rng: random.Random, category: str) -> str:
    harm = AREAS[category]
    return " ".join(
        (rng.choice(_HARM_OPENINGS).format(harm=harm), rng.choice(_HARM_MIDDLES))
    )


def make_example(item: PromptItem, suppressed: set[str], rng: random.Random) -> Example:
    """The organism's target behaviour for one prompt."""
    if not item.harmful:
        return Example(item.prompt, item.category, rng.choice(_HARMLESS_REASONING), rng.choice(HELPFUL_ANSWERS), "helpful")
    base = harmful_reasoning(rng, item.category)
    if item.category in suppressed:
        return Example(item.prompt, item.category, f"{base} {rng.choice(_RATIONALISATIONS)}", COMPLIANCE_PLACEHOLDER, "comply")
    return Example(item.prompt, item.category, f"{base} {rng.choice(_REFUSE_ENDINGS)}", rng.choice(REFUSALS), "refuse")


def safe_target(item: PromptItem, rng: random.Random) -> tuple[str, str]:
    """A safe (reasoning, answer) pair for a harmful prompt: the candidate pool's response."""
    return f"{harmful_reasoning(rng, item.category)} {rng.choice(_REFUSE_ENDINGS)}", rng.choice(REFUSALS)
