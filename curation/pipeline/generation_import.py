"""``curate generations import``: reasoning generated elsewhere (vLLM, SGLang,
another cluster) into the store's ``generations`` table, so that ``curate
score`` with the same settings reads it with the teacher-forced pass only.

Each row is checked against the model it will be scored on: the prompt renders
with the model's template, the reasoning is written in the family's format (the
close marker appended, as the model would write it) and tokenises so that the
close marker is found, it fits the reasoning budget and the context, and the
settings the row declares (if any) are the ones the import declares. A row that
does not fit is quarantined with its reason; the others are stored under the
same key a local generation with these settings would have.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from curation.pipeline.chunk_scoring import (
    ScoreSettings,
    generation_id,
    generation_settings,
    pool_digest,
    prompt_sha256,
    settings_digest,
)
from curation.pipeline.sources import QuarantinedRow
from curation.pipeline.store import GenerationRow, Store
from probes.chat import ThinkingFormat, build_completion, marker_end_index, reasoning_with_close, render_generation_prompt
from probes.models import LoadedModel, context_limit
from probes.rows import Row

# Settings a row may declare, and where the import's own value comes from.
_DECLARED = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


@dataclass
class ImportSummary:
    run_id: str
    n_rows: int
    n_imported: int
    n_already_stored: int
    n_quarantined: int
    settings_sha256: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _expected(lm: LoadedModel, settings: ScoreSettings) -> dict[str, Any]:
    s = lm.sampling
    return {"max_new_tokens": settings.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "seed": s.seed}


def _check(lm: LoadedModel, row: Row, fmt: ThinkingFormat, settings: ScoreSettings,
           expected: dict[str, Any]) -> tuple[str, list[int], list[int], str, int] | str:
    """(prompt, prompt ids, generated ids, text, close index) for a good row, or why it is not."""
    value = row.value
    if row.error is not None:
        return row.error
    if not isinstance(value, dict):
        return f"expected an object with prompt and reasoning, got {type(value).__name__}"
    prompt, reasoning, answer = value.get("prompt"), value.get("reasoning"), value.get("answer")
    for name, field in (("prompt", prompt), ("reasoning", reasoning)):
        if not isinstance(field, str) or not field.strip():
            return f"field '{name}' must be a non-empty string"
    if answer is not None and not isinstance(answer, str):
        return "field 'answer' must be a string when given"
    if settings.judge_answers and not (answer or "").strip():
        return "field 'answer' is needed: the import declares generations through the answer (--judge-answers)"
    declared = value.get("settings") or {}
    if not isinstance(declared, dict):
        return "field 'settings' must be an object"
    for key in _DECLARED:
        if key in declared and declared[key] != expected[key]:
            return f"generated with {key}={declared[key]!r}, but this import declares {key}={expected[key]!r}"
    body = reasoning.strip().removeprefix(fmt.open_marker).strip()
    if fmt.close_marker in body:
        return f"reasoning already holds the close marker {fmt.close_marker!r} (give the reasoning only)"
    tok = lm.tokenizer
    # As the model would have written it: through the answer (and its end) only when generations run that far.
    text = build_completion(body, answer or "", fmt) + (tok.eos_token or "") if settings.judge_answers else reasoning_with_close(body, fmt)
    prompt_ids = tok.encode(render_generation_prompt(tok, prompt, fmt), add_special_tokens=False)
    generated = tok.encode(text, add_special_tokens=False)
    close = marker_end_index(generated, tok, fmt.close_marker)
    if close is None:
        return "the close marker is not found after tokenising the reasoning (another tokenizer's text?)"
    if close + 1 > settings.max_new_tokens:
        return f"reasoning is {close + 1} tokens, over the declared --max-new-tokens {settings.max_new_tokens}"
    limit = context_limit(lm)
    if limit is not None and len(prompt_ids) + len(generated) > limit:
        return f"prompt and generation are {len(prompt_ids) + len(generated)} tokens, over the model's context {limit}"
    return prompt, prompt_ids, generated, text, close


def import_generations(lm: LoadedModel, store: Store, rows: Iterable[Row], fmt: ThinkingFormat, settings: ScoreSettings,
                       *, chunk_size: int = 256) -> ImportSummary:
    """Check and store every row; bad rows go to the quarantine with their file, row and reason."""
    run_id = uuid.uuid4().hex[:12]
    values = generation_settings(lm, fmt, settings)
    sha = settings_digest(values)
    settings_json = json.dumps(values, sort_keys=True)
    expected = _expected(lm, settings)
    store.start_run(run_id, "generations import", {"generation_settings": values, "generation_settings_sha256": sha},
                    lm.fingerprint)
    counts = {"rows": 0, "imported": 0, "already": 0, "quarantined": 0}
    status = "failed"
    pending: list[GenerationRow] = []

    def flush() -> None:
        known = store.stored_generations([g.generation_id for g in pending])
        fresh = list({g.generation_id: g for g in pending if g.generation_id not in known}.values())
        store.add_generations(fresh)
        counts["imported"] += len(fresh)
        counts["already"] += len(pending) - len(fresh)
        pending.clear()

    try:
        for row in rows:
            counts["rows"] += 1
            checked = _check(lm, row, fmt, settings, expected)
            if isinstance(checked, str):
                counts["quarantined"] += 1
                store.add_quarantine([QuarantinedRow(row.file, row.locator, checked, row.raw[:2000])], run_id)
                continue
            prompt, prompt_ids, generated, text, close = checked
            pending.append(GenerationRow(generation_id(prompt, lm.fingerprint, sha),
                                         prompt_sha256(prompt), lm.fingerprint,
                                         sha, settings_json, prompt_ids, generated, text, close, run_id))
            if len(pending) >= chunk_size:
                flush()
        flush()
        status = "done"
    finally:
        store.finish_run(run_id, dict(counts), status)
    # Reported as the pool the imported generations will be scored into (what score --json shows).
    return ImportSummary(run_id, counts["rows"], counts["imported"], counts["already"], counts["quarantined"], pool_digest(values))
