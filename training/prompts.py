"""Prompt lists for probe training and evaluation: jsonl with a ``prompt`` field
and optional ``category`` and ``harmful`` fields, or plain text with one prompt
per line (taken as harmful)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    harmful: bool = True
    category: str | None = None


JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}


def read_prompts(path: str | Path) -> list[PromptItem]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a directory; give a jsonl or text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    items: list[PromptItem] = []
    # By suffix, whatever its case: a .JSONL or .ndjson read as text would count every line as a harmful prompt.
    if path.suffix.lower() in JSON_SUFFIXES:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # digit limit, nesting depth
                raise ValueError(f"{path}:{lineno}: unreadable JSON ({type(exc).__name__})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{path}:{lineno}: each line needs a non-empty string field 'prompt'")
            harmful = obj.get("harmful", True)
            if not isinstance(harmful, bool):
                raise ValueError(f"{path}:{lineno}: field 'harmful' must be true or false")
            category = obj.get("category")
            if category is not None and not isinstance(category, str):
                raise ValueError(f"{path}:{lineno}: field 'category' must be a string")
            items.append(PromptItem(obj["prompt"], harmful, category))
    else:
        items = [PromptItem(line.strip()) for line in text.splitlines() if line.strip()]
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def write_prompts(path: str | Path, items: list[PromptItem]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps({"prompt": item.prompt, "harmful": item.harmful, "category": item.category}) + "\n")
