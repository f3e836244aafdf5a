"""The harmony check of ``curate doctor``: gpt-oss prompts are rendered by openai-harmony, not by the
checkpoint's chat template, so the two must agree on what the model is shown.

Everything after the system message (developer instructions, the user's turn, the generation
prompt) must be the same text. The system message itself is meta information that checkpoints and
template revisions vary (model identity, knowledge cutoff, today's date, which the project leaves
out on purpose so that a prompt renders the same text every day): there the check asks only that
it states the same reasoning effort. Whitespace before ``<|end|>`` is not compared (published
revisions of the template differ there).
"""

from __future__ import annotations

import re

from probes.chat import ThinkingFormat
from probes.doctor_base import PROMPTS, CheckResult, make_check

_BEFORE_END = re.compile(r"\s+<\|end\|>")
_SYSTEM = "<|start|>system<|message|>"


def _split_system(text: str) -> tuple[str, str]:
    """(the system message's text, everything after it), whitespace before ``<|end|>`` dropped."""
    text = _BEFORE_END.sub("<|end|>", text)
    if text.startswith(_SYSTEM) and "<|end|>" in text:
        end = text.index("<|end|>")
        return text[len(_SYSTEM):end], text[end:]
    return "", text


def check_harmony_prompt(tok, fmt: ThinkingFormat) -> CheckResult:
    from probes import harmony

    name, limit = "harmony prompt agrees with the template", "same turns after the system message; same reasoning effort"
    try:
        ours = harmony.render_prompt(PROMPTS[0], fmt.system_prompt, fmt.template_kwargs)
    except harmony.HarmonyUnavailable as exc:
        return make_check(name, limit, 0.0, False, str(exc))
    messages = ([{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []) + [
        {"role": "user", "content": PROMPTS[0]}]
    theirs = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **fmt.template_kwargs))
    (our_system, a), (their_system, b) = _split_system(ours), _split_system(theirs)
    effort = next((line for line in our_system.splitlines() if line.startswith("Reasoning:")), "")
    if effort not in their_system.splitlines():
        return make_check(name, limit, 0.0, False, f"the template's system message does not say {effort!r} "
                          f"(it reads {their_system[:120]!r}); pass the template's reasoning_effort with --chat-template-kwargs")
    if a == b:
        return make_check(name, limit, 1.0, True)
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return make_check(name, limit, 0.0, False, f"after the system message they differ at character {at}: "
                      f"openai-harmony {a[at:at + 60]!r}, template {b[at:at + 60]!r}")
