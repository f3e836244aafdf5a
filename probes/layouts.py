"""Column layouts: how a source's columns become the canonical fields
(``prompt``, ``response``, ``category``, ``source``, ``id``, ``harmful``), by
``--format`` presets for the sets safety teams curate from and ``--map`` pairs
for their own, and which rows to keep (``--where``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CANONICAL = ("prompt", "response", "category", "source", "id", "harmful")


def parse_map(text: str | None) -> dict[str, str]:
    """``prompt=adversarial,response=completion`` -> {"prompt": "adversarial", …}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        field, sep, column = part.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise ValueError(f"--map: expected FIELD=COLUMN pairs separated by commas, got {part.strip()!r}")
        if field not in CANONICAL:
            raise ValueError(f"--map: unknown field {field!r}; fields are {', '.join(CANONICAL)}")
        out[field] = column
    return out


def _harmful_from_type(value: Any) -> bool | None:
    """WildJailbreak's data_type (vanilla_harmful, adversarial_benign, …) as a harmful flag."""
    if not isinstance(value, str):
        return None
    return value.endswith("harmful") if value.endswith(("harmful", "benign")) else None


def _first_text(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return row.get(names[0])


def _wildjailbreak(row: Mapping[str, Any], close: str) -> dict[str, Any]:
    # The adversarial rewrite when the row has one, else the vanilla request.
    out = {"prompt": _first_text(row, "adversarial", "vanilla"), "response": row.get("completion"),
           "category": row.get("data_type"), "harmful": _harmful_from_type(row.get("data_type"))}
    return {k: v for k, v in out.items() if v is not None}


def _reasoning_set(row: Mapping[str, Any], close: str) -> dict[str, Any]:
    """STAR-1 / SafeChain style: instruction (or question, prompt), reasoning, response. A separate
    reasoning column is joined to the response with the close marker, the candidate record's layout."""
    prompt = _first_text(row, "instruction", "question", "prompt")
    response = row.get("response")
    reasoning = row.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip() and isinstance(response, str) and close not in response:
        response = f"{reasoning.strip()}\n{close}\n\n{response.strip()}"
    out = {"prompt": prompt, "response": response, "category": row.get("category"), "source": row.get("source"),
           "id": row.get("id")}
    return {k: v for k, v in out.items() if v is not None}


def _messages(row: Mapping[str, Any], close: str) -> dict[str, Any]:
    """A chat: the last user turn is the prompt, the assistant turn after it the response (with its
    ``reasoning_content`` or ``thinking`` joined by the close marker when the model kept it apart)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("field 'messages' must be a list of {role, content} objects")
    user_at = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if user_at is None:
        raise ValueError("field 'messages' has no user turn")
    reply = next((m for m in messages[user_at + 1:] if m.get("role") == "assistant"), None)
    out: dict[str, Any] = {"prompt": messages[user_at].get("content"), "category": row.get("category"), "id": row.get("id")}
    if reply is not None:
        response = reply.get("content")
        thinking = reply.get("reasoning_content") or reply.get("thinking")
        if isinstance(thinking, str) and thinking.strip() and isinstance(response, str) and close not in response:
            response = f"{thinking.strip()}\n{close}\n\n{response.strip()}"
        out["response"] = response
    if isinstance(row.get("harmful"), bool):
        out["harmful"] = row["harmful"]
    return {k: v for k, v in out.items() if v is not None}


PRESETS: dict[str, Callable[[Mapping[str, Any], str], dict[str, Any]]] = {
    "wildjailbreak": _wildjailbreak,
    "reasoning": _reasoning_set,
    "messages": _messages,
}


@dataclass(frozen=True)
class Layout:
    """How a source's columns become the canonical fields, and which rows to keep."""

    preset: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (field, column) from --map
    where: tuple[tuple[str, bool, frozenset[str]], ...] = ()  # (column, equal?, values) from --where
    close_marker: str = "</think>"

    @classmethod
    def from_flags(cls, preset: str | None, mapping: str | None, where: str | None, close_marker: str = "</think>") -> Layout:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"--format: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        return cls(preset=preset, columns=tuple(parse_map(mapping).items()), where=parse_where(where), close_marker=close_marker)

    def keeps(self, row: Mapping[str, Any]) -> bool:
        for column, equal, values in self.where:
            value = row.get(column)
            hit = (str(value) if value is not None else "") in values
            if hit != equal:
                return False
        return True

    def apply(self, row: Any) -> Any:
        """The row with canonical field names (a row that is not a mapping is returned as it is,
        for the caller to reject with its own reason)."""
        if not isinstance(row, Mapping):
            return row
        out: dict[str, Any] = dict(row) if self.preset is None else {**_extras(row), **PRESETS[self.preset](row, self.close_marker)}
        for field, column in self.columns:
            if column not in row:
                raise ValueError(f"--map {field}={column}: the row has no column '{column}'")
            out[field] = row[column]
        return out


def _extras(row: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's source columns stay with the record as extra fields, not as canonical ones."""
    return {f"src_{k}" if k in CANONICAL else k: v for k, v in row.items()
            if isinstance(v, (str, int, float, bool)) or v is None}


def parse_where(text: str | None) -> tuple[tuple[str, bool, frozenset[str]], ...]:
    """``data_type=vanilla_harmful,adversarial_harmful;source!=web`` -> conditions, all must hold."""
    out = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        negate = "!=" in part
        column, _, values = part.partition("!=" if negate else "=")
        column = column.strip()
        choices = frozenset(v.strip() for v in values.split(",") if v.strip())
        if not column or not choices:
            raise ValueError(f"--where: expected COLUMN=V1,V2 or COLUMN!=V (conditions joined by ';'), got {part.strip()!r}")
        out.append((column, not negate, choices))
    return tuple(out)
