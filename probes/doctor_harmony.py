"""The harmony check of ``curate doctor``: gpt-oss prompts are rendered by openai-harmony, not by the
checkpoint's chat template, so the two must agree on what the model is shown.

The only difference allowed is the one the project makes on purpose: the published template writes
today's date into the system message (``Current date: …``), which would give every day's prompts a
different text and key; the library's rendering leaves it out. Whitespace before ``<|end|>`` is
not compared (published revisions of the template differ there).
"""

from __future__ import annotations

import re

from probes.chat import ThinkingFormat
from probes.doctor_base import PROMPTS, CheckResult, make_check

_DATE_LINE = re.compile(r"Current date: [^\n]*\n")
_BEFORE_END = re.compile(r"\s+<\|end\|>")


def _comparable(text: str) -> str:
    return _BEFORE_END.sub("<|end|>", _DATE_LINE.sub("", text))


def check_harmony_prompt(tok, fmt: ThinkingFormat) -> CheckResult:
    from probes import harmony

    name, limit = "harmony prompt agrees with the template", "openai-harmony's prompt = the template's, less the date line"
    try:
        ours = harmony.render_prompt(PROMPTS[0], fmt.system_prompt, fmt.template_kwargs)
    except harmony.HarmonyUnavailable as exc:
        return make_check(name, limit, 0.0, False, str(exc))
    messages = ([{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []) + [
        {"role": "user", "content": PROMPTS[0]}]
    theirs = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **fmt.template_kwargs))
    a, b = _comparable(ours), _comparable(theirs)
    if a == b:
        return make_check(name, limit, 1.0, True)
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return make_check(name, limit, 0.0, False, f"they differ at character {at}: openai-harmony {a[at:at + 60]!r}, "
                      f"template {b[at:at + 60]!r}")
