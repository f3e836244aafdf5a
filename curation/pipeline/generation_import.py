"""``curate generations import``: reasoning generated elsewhere (vLLM, SGLang,
another cluster) into the store's ``generations`` table, so that ``curate
score`` with the same settings reads it with the teacher-forced pass only.

Each row is checked against the model it will be scored on: the prompt renders
with the model's template, the reasoning is written in the family's format (the
close marker appended, as the model would write it) and tokenises so that the
close marker is found, it fits the reasoning budget and the context, and the
settings the row declares (if any) are the ones the import declares: decoding
and budget, and also the model fingerprint, the dtype and the chat template's
digest, since those are part of the key it is stored under. A row that does not
fit is quarantined with its reason; the others are stored under the same key a
local generation with these settings would have.

One prompt twice in a file with different reasoning: both rows are quarantined
(which one is the model's is not ours to guess); the same row twice is stored
once. A prompt already stored with different reasoning is kept as stored and
counted (``n_conflicting``); ``--replace`` stores the imported one instead.
"""

from __future__ import annotations

import hashlib
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
    n_conflicting: int = 0  # stored with other reasoning: kept as stored unless --replace
    n_replaced: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _expected(lm: LoadedModel, settings: ScoreSettings, dtype: str) -> dict[str, Any]:
    s = lm.sampling
    template = lm.tokenizer.chat_template
    return {"max_new_tokens": settings.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "seed": s.seed, "model_fingerprint": lm.fingerprint,
            "dtype": dtype,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None}


# Identity a row may declare at its top level as well as under "settings".
_IDENTITY = ("model_fingerprint", "dtype", "chat_template_sha256")


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
    for key in _IDENTITY:
        for where, given in (("row", value), ("settings", declared)):
            if key in given and str(given[key]).removeprefix("torch.") != str(expected[key]):
                return (f"declares {key}={given[key]!r} ({where}), but it would be stored under this model's "
                        f"{key}={expected[key]!r}; import it with the model it was generated with")
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
                       *, chunk_size: int = 256, replace: bool = False) -> ImportSummary:
    """Check and store every row; bad rows go to the quarantine with their file, row and reason."""
    run_id = uuid.uuid4().hex[:12]
    values = generation_settings(lm, fmt, settings)
    sha = settings_digest(values)
    settings_json = json.dumps(values, sort_keys=True)
    expected = _expected(lm, settings, values["dtype"])
    store.start_run(run_id, "generations import", {"generation_settings": values, "generation_settings_sha256": sha},
                    lm.fingerprint)
    counts = {"rows": 0, "imported": 0, "already": 0, "quarantined": 0, "conflicting": 0, "replaced": 0}
    status = "failed"
    pending: dict[str, GenerationRow] = {}
    # Per prompt seen in this import: its text's digest, where it was, and whether it is already out.
    seen: dict[str, dict[str, Any]] = {}

    def flush() -> None:
        chunk = list(pending.values())
        pending.clear()
        known = store.stored_generations([g.generation_id for g in chunk])
        fresh = [g for g in chunk if g.generation_id not in known]
        other = [g for g in chunk if g.generation_id in known and known[g.generation_id].text != g.text]
        counts["already"] += len(chunk) - len(fresh) - len(other)
        counts["conflicting"] += len(other)
        if replace and other:
            store.replace_generations(other)
            counts["replaced"] += len(other)
        store.add_generations(fresh)
        counts["imported"] += len(fresh)
        for g in fresh:
            seen[g.generation_id]["stored"] = True

    def quarantine(file: str, locator: int, why: str, raw: str) -> None:
        counts["quarantined"] += 1
        store.add_quarantine([QuarantinedRow(file, locator, why, raw)], run_id)

    try:
        for row in rows:
            counts["rows"] += 1
            checked = _check(lm, row, fmt, settings, expected)
            if isinstance(checked, str):
                quarantine(row.file, row.locator, checked, row.raw[:2000])
                continue
            prompt, prompt_ids, generated, text, close = checked
            gid = generation_id(prompt, lm.fingerprint, sha)
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            first = seen.get(gid)
            if first is None:
                seen[gid] = {"sha": digest, "file": row.file, "line": row.locator, "raw": row.raw[:2000], "stored": False,
                             "out": False}
                pending[gid] = GenerationRow(gid, prompt_sha256(prompt), lm.fingerprint, sha, settings_json, prompt_ids,
                                             generated, text, close, run_id)
                if len(pending) >= chunk_size:
                    flush()
                continue
            if first["sha"] == digest and not first["out"]:
                counts["already"] += 1  # the same row twice: stored once
                continue
            # One prompt, different reasoning: which one is the model's is not ours to guess, so neither is kept.
            why = (f"the same prompt is given more than once in this import with different reasoning "
                   f"(first at row {first['line']}, again at row {row.locator})")
            quarantine(row.file, row.locator, why, row.raw[:2000])
            if not first["out"]:
                first["out"] = True
                pending.pop(gid, None)
                if first["stored"]:
                    store.delete_generations([gid], run_id)
                    counts["imported"] -= 1
                quarantine(first["file"], first["line"], why, first["raw"])
        flush()
        status = "done"
    finally:
        store.finish_run(run_id, dict(counts), status)
    # Reported as the pool the imported generations will be scored into (what score --json shows).
    return ImportSummary(run_id, counts["rows"], counts["imported"], counts["already"], counts["quarantined"], pool_digest(values),
                         counts["conflicting"], counts["replaced"])
