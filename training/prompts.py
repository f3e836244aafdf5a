"""Prompt lists for probe training and evaluation: rows with a ``prompt`` field
and optional ``category`` and ``harmful`` fields (jsonl, csv, parquet or a saved
dataset, read by ``probes.rows``), or plain text with one prompt per line (taken
as harmful)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from probes.layouts import Layout
from probes.rows import iter_rows, kind_of


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    harmful: bool = True
    category: str | None = None


_TRUE, _FALSE = {"true", "1", "yes", "harmful"}, {"false", "0", "no", "benign", "harmless"}


def read_prompts(path: str | Path, layout: Layout | None = None) -> list[PromptItem]:
    """Prompts from jsonl, csv, parquet (a file, a folder or a glob) or a saved Hugging Face
    dataset through the one row reader, with ``layout`` mapping columns (``--format``, ``--map``,
    ``--where``); or from a text file, one harmful prompt per line. A prompt list is small and
    curated, so a bad row is an error naming its file and line, not a quarantine."""
    text_path = Path(path)
    if text_path.is_file() and kind_of(text_path) == "text":
        try:
            text = text_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{text_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        items = [PromptItem(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        layout = layout or Layout()
        items = []
        for row in iter_rows(path, "--prompts"):
            where = f"{row.file}:{row.locator}"
            if row.error is not None:
                raise ValueError(f"{where}: {row.error}")
            if isinstance(row.value, dict) and not layout.keeps(row.value):
                continue
            items.append(_prompt_item(layout.apply(row.value), where))
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _prompt_item(obj: object, where: str) -> PromptItem:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError(f"{where}: each row needs a non-empty string field 'prompt'")
    harmful = obj.get("harmful", True)
    if isinstance(harmful, str) and harmful.strip().lower() in _TRUE | _FALSE:  # csv holds text
        harmful = harmful.strip().lower() in _TRUE
    if isinstance(harmful, int) and not isinstance(harmful, bool) and harmful in (0, 1):
        harmful = bool(harmful)
    if not isinstance(harmful, bool):
        raise ValueError(f"{where}: field 'harmful' must be true or false")
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise ValueError(f"{where}: field 'category' must be a string")
    return PromptItem(obj["prompt"], harmful, category)


def write_prompts(path: str | Path, items: list[PromptItem]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps({"prompt": item.prompt, "harmful": item.harmful, "category": item.category}) + "\n")
