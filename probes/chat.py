"""Chat-template and thinking-span handling: the one place that knows how a
reasoning model's prompt is rendered and where its reasoning starts and stops.

Reasoning models differ in three ways that matter here:
- the markers (``<think>``/``</think>`` for DeepSeek-R1 distills, QwQ, Qwen3
  thinking mode, and the bundled organism; configurable for anything else);
- whether the chat template already opens the thinking block in the generation
  prompt (R1 distills and the organism do; Qwen3 does not);
- whether a trace closes at all (generation may hit its length cap first).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

RENDERERS = ("template", "openai-harmony")


@dataclass(frozen=True)
class ThinkingFormat:
    """How one model family marks its reasoning.

    ``template_kwargs`` go straight to ``apply_chat_template`` (for example
    ``{"enable_thinking": True}`` for Qwen3).
    """

    open_marker: str = "<think>"
    close_marker: str = "</think>"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    # What a model of this format writes after the open marker, before the close
    # marker, and between the close marker and the answer (harmony: the final
    # channel's header). Facts of the format, used to write training targets in it.
    after_open: str = "\n"
    before_close: str = "\n"
    after_close: str = "\n\n"
    # Who renders prompts and turns and parses completions: the model's chat template and these
    # markers, or OpenAI's harmony library (gpt-oss: probes.harmony).
    renderer: str = "template"

    def __post_init__(self) -> None:
        if not self.open_marker or not self.close_marker:
            raise ValueError("thinking markers must be non-empty strings")
        if self.open_marker == self.close_marker:
            raise ValueError("open_marker and close_marker must differ")
        if self.renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {', '.join(RENDERERS)}, got {self.renderer!r}")

    @property
    def harmony(self) -> bool:
        return self.renderer == "openai-harmony"


@dataclass(frozen=True)
class SplitCompletion:
    """A generated continuation cut into its reasoning and its final answer."""

    reasoning: str
    answer: str
    closed: bool  # False when the close marker never appeared (length-capped trace)
    # Harmony messages that are neither (tool calls, preambles, later analysis), kept as written.
    other: tuple[Any, ...] = ()


def render_generation_prompt(
    tokenizer: PreTrainedTokenizerBase, user_prompt: str, fmt: ThinkingFormat
) -> str:
    """The text a model continues from, always ending inside an open thinking block.

    If the model's template does not open the block itself, the open marker is
    appended so that every model starts reasoning at the same point.
    """
    if fmt.harmony:
        from probes import harmony

        return harmony.render_prompt(user_prompt, fmt.system_prompt, fmt.template_kwargs) + fmt.open_marker + fmt.after_open
    messages: list[dict[str, str]] = []
    if fmt.system_prompt:
        messages.append({"role": "system", "content": fmt.system_prompt})
    messages.append({"role": "user", "content": user_prompt})
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; reasoning models "
            "need one (set tokenizer.chat_template or use a chat/instruct checkpoint)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **fmt.template_kwargs
    )
    assert isinstance(text, str)
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **fmt.template_kwargs)
    problem = closed_before_thinking(text, str(plain), user_prompt, fmt)
    if problem:
        raise ValueError(f"{tokenizer.name_or_path}: {problem}")
    if not text.rstrip().endswith(fmt.open_marker):
        text = text + fmt.open_marker + fmt.after_open
    return text


def end_tokens(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None,
               fmt: ThinkingFormat | None = None) -> tuple[str, ...]:
    """The strings that end a model's turn, read from the tokenizer and the checkpoint's
    generation config (never from a list of known names): the EOS token, every id in
    ``generation_config.eos_token_id`` (gpt-oss: ``<|return|>``, ``<|call|>``; Qwen3:
    ``<|im_end|>``; Llama 3: ``<|eot_id|>``…) and the pad token, which batched generation
    writes after a finished row. The thinking markers are never end tokens (harmony's close
    marker ``<|end|>`` ends a message, not the turn)."""
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id, tokenizer.pad_token_id):
        if isinstance(source, int):
            ids.append(source)
        elif isinstance(source, (list, tuple)):
            ids.extend(int(i) for i in source)
    markers = {fmt.open_marker, fmt.close_marker} if fmt is not None else set()
    found: list[str] = []
    for i in ids:
        text = tokenizer.convert_ids_to_tokens(int(i))
        if isinstance(text, str) and text and text not in markers and text not in found:
            found.append(text)
    return tuple(found)


def _cut_at_end(text: str, ends: Sequence[str]) -> str:
    """``text`` up to the first end token: whatever follows it (padding, a second end token)
    is not the model's content."""
    cut = -1
    for end in ends:  # a plain loop: this runs once per exported row, millions of times a night
        at = text.find(end) if end else -1
        if at >= 0 and (cut < 0 or at < cut):
            cut = at
    return text if cut < 0 else text[:cut]


def closed_before_thinking(rendered: str, plain: str, user_prompt: str, fmt: ThinkingFormat) -> str | None:
    """Why a rendered generation prompt would tell the model its thinking is over before it
    starts: the generation prompt adds a close marker after the user's turn (DeepSeek-V3.1's
    template without ``thinking=True`` ends in ``</think>``, Qwen3's without ``enable_thinking``
    in an empty block). ``plain`` is the same conversation without the generation prompt: a
    close marker that also ends the user's turn there (harmony's ``<|end|>``) is not one.
    None when the prompt leaves the model free to reason."""

    def after_user(text: str) -> str:
        at = text.rfind(user_prompt)
        return text[at + len(user_prompt):] if at >= 0 else text

    tail = after_user(rendered)
    if tail.count(fmt.close_marker) > after_user(plain).count(fmt.close_marker):
        kwargs = json.dumps(fmt.template_kwargs) if fmt.template_kwargs else "none"
        return (f"the chat template closes the thinking block in the generation prompt (ends {tail[-60:]!r}), so the model "
                f"would be told its thinking is over before it starts; template arguments used: {kwargs}. Set the ones the "
                "template needs with --chat-template-kwargs (e.g. '{\"thinking\": true}' for DeepSeek-V3.1, "
                "'{\"enable_thinking\": true}' for Qwen3), or check with curate doctor")
    return None


def split_completion(text: str, fmt: ThinkingFormat, ends: Sequence[str] = ()) -> SplitCompletion:
    """Cut generated text (everything after the generation prompt) at the close marker; the
    answer (or unclosed reasoning) ends at the first of ``ends`` (``end_tokens``), so neither
    is ever judged or trained with the end marker inside it."""
    if fmt.harmony:
        return _split_harmony(text, fmt, ends)
    body = text.lstrip()
    if body.startswith(fmt.open_marker):
        # Some models re-emit the open marker even when the template opened it.
        body = body[len(fmt.open_marker) :]
    idx = body.find(fmt.close_marker)
    if idx < 0:
        return SplitCompletion(reasoning=_cut_at_end(body, ends).strip(), answer="", closed=False)
    reasoning = body[:idx].strip()
    answer = _cut_at_end(body[idx + len(fmt.close_marker) :], ends).strip()
    header = fmt.after_close.strip()
    if header and answer.startswith(header):
        answer = answer[len(header) :].strip()
    return SplitCompletion(reasoning=reasoning, answer=answer, closed=True)


def _split_harmony(text: str, fmt: ThinkingFormat, ends: Sequence[str]) -> SplitCompletion:
    from probes import harmony

    body = text.lstrip().removeprefix("<|start|>assistant")
    if not body.startswith("<|channel|>"):
        body = fmt.open_marker + body  # the generation prompt opened the analysis message
    turn = harmony.parse_turn(body, ends)
    if not turn.closed and turn.reasoning.startswith(fmt.open_marker):  # nothing parsed: the text as written
        return SplitCompletion(reasoning=_cut_at_end(text, ends).strip(), answer="", closed=False)
    return SplitCompletion(reasoning=turn.reasoning, answer=turn.answer, closed=turn.closed, other=turn.other)


def build_completion(reasoning: str, answer: str, fmt: ThinkingFormat) -> str:
    """Reasoning, close marker and answer: the assistant-turn text after the prompt."""
    if fmt.harmony:
        from probes import harmony

        return harmony.render_turn(reasoning, answer).removeprefix(fmt.open_marker)
    return f"{reasoning_with_close(reasoning, fmt)}{fmt.after_close}{answer.strip()}"


def reasoning_with_close(reasoning: str, fmt: ThinkingFormat) -> str:
    """The reasoning text followed by the close marker, as it is teacher-forced."""
    return f"{reasoning.strip()}{fmt.before_close}{fmt.close_marker}"


def marker_end_index(
    token_ids: list[int], tokenizer: PreTrainedTokenizerBase, marker: str
) -> int | None:
    """Index of the last token of the first occurrence of ``marker`` in ``token_ids``.

    Tries an exact token-subsequence match first (the usual case: the marker is a
    special token); falls back to a binary search over decoded prefixes, which
    handles markers that tokenise differently in context. None if absent.
    """
    marker_ids = tokenizer.encode(marker, add_special_tokens=False)
    n = len(marker_ids)
    if n:
        for i in range(len(token_ids) - n + 1):
            if token_ids[i : i + n] == marker_ids:
                return i + n - 1

    def contains(k: int) -> bool:
        return marker in tokenizer.decode(token_ids[:k], skip_special_tokens=False)

    if not token_ids or not contains(len(token_ids)):
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:  # smallest prefix length whose decoding contains the marker
        mid = (lo + hi) // 2
        if contains(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, markers: list[str]) -> list[int]:
    """Token ids that end generation: single-token markers plus the tokenizer's EOS."""
    ids: list[int] = []
    for marker in markers:
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def post_instruction_length(tokenizer: PreTrainedTokenizerBase, fmt: ThinkingFormat) -> int:
    """How many tokens the template puts after the user's text in a generation
    prompt (end of turn, assistant header, open marker): the "post-instruction"
    positions where refusal directions are read. Found as the longest common
    token suffix of two renderings that differ only in the user's text."""
    a = tokenizer.encode(render_generation_prompt(tokenizer, "first question?", fmt), add_special_tokens=False)
    b = tokenizer.encode(render_generation_prompt(tokenizer, "another, longer question here.", fmt), add_special_tokens=False)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise ValueError("the chat template adds no tokens after the user's text; no post-instruction positions")
    return n


def processor_chat_template(model_dir: str | Path) -> str | None:
    """The template a multimodal checkpoint keeps beside its processor (``chat_template.jinja`` or
    ``chat_template.json``) rather than with its tokenizer; None when there is none."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(model_dir) / name
        if path.exists():
            text = path.read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """A whole conversation in the model's own template, with no generation prompt added:
    how classifier models whose instruction lives in their template (Llama Guard,
    Qwen3Guard) are given a (request, answer) pair, as their cards call it."""
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name_or_path}: no chat template (tokenizer_config.json, chat_template.jinja or "
                         "chat_template.json); this judge's card renders its input with it")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(text, str)
    return text
