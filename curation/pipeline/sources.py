"""Candidate safety examples in: one record schema, a stable content hash, and a
quarantine list for rows that cannot be used (never dropped silently)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from probes.chat import ThinkingFormat, split_completion
from probes.layouts import Layout
from probes.rows import Row, has_surrogate, iter_rows

_KNOWN_FIELDS = {"id", "prompt", "response", "category", "source"}


@dataclass(frozen=True)
class CandidateRecord:
    id: str
    prompt: str
    response: str  # the safe target: reasoning, close marker, refusal (or a refusal alone)
    category: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the row was read (not stored with the example): a row that fails a
    # later check, such as the context limit, is quarantined with its file and line.
    origin: tuple[str, int] | None = field(default=None, compare=False)
    # The id the row declared, if any (our id is the content hash).
    source_id: str | None = field(default=None, compare=False)
    # Content already read earlier in the same stream: not scored again, but its id and
    # category are kept as an alias of the example.
    repeat: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class QuarantinedRow:
    source: str
    line: int
    reason: str
    raw: str


@dataclass
class ReadResult:
    records: list[CandidateRecord]
    quarantined: list[QuarantinedRow]
    duplicates: int = 0


def normalise(text: str) -> str:
    """NFC, trimmed, inner whitespace collapsed: the form that is hashed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_id(prompt: str, response: str) -> str:
    h = hashlib.sha256()
    h.update(normalise(prompt).encode())
    h.update(b"\x1f")
    h.update(normalise(response).encode())
    return h.hexdigest()[:20]


def split_response(response: str, fmt: ThinkingFormat, ends: Sequence[str] = ()) -> tuple[str, str]:
    """(reasoning, answer) of a candidate's response; without a close marker the
    whole response is the answer. The answer ends at the first of ``ends`` (the model's end tokens)."""
    reasoning, answer, _ = response_parts(response, fmt, ends)
    return reasoning, answer


def response_parts(response: str, fmt: ThinkingFormat, ends: Sequence[str] = ()) -> tuple[str, str, list[dict[str, Any]]]:
    """(reasoning, answer, other messages) of a candidate's response, read once. The other messages
    are a harmony response's tool calls, preambles and later analysis, as written (exports keep them
    beside the pair); every other format has none."""
    if fmt.harmony:
        if "<|channel|>" not in response:  # no harmony header at all: a plain answer
            return "", split_completion(fmt.close_marker + response, replace(fmt, renderer="template"), ends).answer, []
        split = split_completion(response, fmt, ends)
        return split.reasoning, split.answer, [asdict(m) for m in split.other]
    idx = response.find(fmt.close_marker)
    if idx < 0:
        return "", split_completion(fmt.close_marker + response, fmt, ends).answer, []
    split = split_completion(response, fmt, ends)
    return split.reasoning.replace(fmt.open_marker, "").strip(), split.answer, []


def _validate(obj: object) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"row is a JSON {type(obj).__name__}, expected an object"
    for name in ("prompt", "response"):
        if name not in obj:
            return None, f"missing field '{name}'"
        if not isinstance(obj[name], str):
            return None, f"field '{name}' must be a string, got {type(obj[name]).__name__}"
        if not obj[name].strip():
            return None, f"field '{name}' is empty"
    for name in ("category", "source", "id"):
        if name in obj and obj[name] is not None and not isinstance(obj[name], str):
            return None, f"field '{name}' must be a string, got {type(obj[name]).__name__}"
    for name in ("prompt", "response", "category", "source", "id"):
        if isinstance(obj.get(name), str) and has_surrogate(obj[name]):
            # Valid JSON ("\ud800"), but no UTF-8 text: it would fail at hashing or storing.
            return None, f"field '{name}' holds a lone surrogate escape (not valid Unicode text)"
    return obj, None


def iter_candidates(
    spec: str | Path, source: str | None = None, counts: dict[str, int] | None = None, layout: Layout | None = None,
    flag: str = "--data",
) -> Iterator[CandidateRecord | QuarantinedRow]:
    """Stream candidate records from jsonl, csv, parquet (a file, a folder or a glob) or a saved
    Hugging Face dataset, with bad rows yielded as ``QuarantinedRow`` (file, line or row number,
    reason) in their place: every row that is not blank or filtered out by ``layout.where``
    yields exactly one item, and no row, however malformed, raises. Content met before in the
    stream is yielded again with ``repeat=True`` (its id and category become aliases) and counted
    in ``counts["duplicates"]``; rows left out by ``--where`` are counted in ``counts["filtered"]``.
    The only state kept is one short id per distinct row."""
    layout = layout or Layout()
    # Content ids met so far, as integers (the 80-bit id whole: no collision is added): the one thing
    # kept for the whole stream, and an int costs half of its 20-character string.
    seen_ids: set[int] = set()
    declared: dict[str, str] = {}
    for row in iter_rows(spec, flag):
        src = source or Path(row.file.split("[")[0]).name
        try:
            if row.error is None and isinstance(row.value, dict) and not layout.keeps(row.value):
                if counts is not None:
                    counts["filtered"] = counts.get("filtered", 0) + 1
                continue
            item = _read_row(row, layout, src, seen_ids, declared)
        except Exception as exc:  # noqa: BLE001 - one row never stops the job: whatever it raises, it is quarantined
            item = QuarantinedRow(row.file, row.locator, f"unreadable row: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                                  row.raw)
        if isinstance(item, CandidateRecord) and item.repeat and counts is not None:
            counts["duplicates"] = counts.get("duplicates", 0) + 1
        yield item


def iter_jsonl(
    path: str | Path, source: str | None = None, counts: dict[str, int] | None = None
) -> Iterator[CandidateRecord | QuarantinedRow]:
    """``iter_candidates`` with the default layout (the name the jsonl-only reader had)."""
    return iter_candidates(path, source, counts)


def _read_row(row: Row, layout: Layout, src: str, seen_ids: set[int],
              declared: dict[str, str]) -> CandidateRecord | QuarantinedRow:
    if row.error is not None:
        return QuarantinedRow(row.file, row.locator, row.error, row.raw)
    mapped, reason = _validate(layout.apply(row.value))
    if mapped is None:
        return QuarantinedRow(row.file, row.locator, reason or "invalid row", row.raw)
    cid = content_id(mapped["prompt"], mapped["response"])
    user_id = mapped.get("id")
    if user_id is not None:
        if user_id in declared and declared[user_id] != cid:
            return QuarantinedRow(row.file, row.locator, f"duplicate id with different content: '{user_id}'", row.raw)
        declared[user_id] = cid
    key = int(cid, 16)
    repeat = key in seen_ids
    seen_ids.add(key)
    extra = {k: v for k, v in mapped.items() if k not in _KNOWN_FIELDS}
    # Extra fields are stored as JSON text: NaN, infinities or lone surrogates in them fail here, for this row only.
    json.dumps(extra, allow_nan=False, ensure_ascii=False, default=str).encode("utf-8")
    if user_id is not None:
        extra["source_id"] = user_id
    return CandidateRecord(
        id=cid,
        prompt=mapped["prompt"],
        response=mapped["response"],
        category=mapped.get("category"),
        source=mapped.get("source") or src,
        extra=extra,
        origin=(row.file, row.locator),
        source_id=user_id,
        repeat=repeat,
    )


def read_jsonl(path: str | Path, source: str | None = None) -> ReadResult:
    """All of a jsonl file at once (small files, tests); see ``iter_jsonl``."""
    records: list[CandidateRecord] = []
    quarantined: list[QuarantinedRow] = []
    counts: dict[str, int] = {}
    for item in iter_jsonl(path, source, counts):
        if isinstance(item, QuarantinedRow):
            quarantined.append(item)
        elif not item.repeat:
            records.append(item)
    return ReadResult(records=records, quarantined=quarantined, duplicates=counts.get("duplicates", 0))
