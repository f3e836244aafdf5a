"""The scoring job: the model's own reasoning for each candidate prompt, the
probe's per-token refusal trace over it, cliff metrics, one store row each.

Incremental by construction: only (example, model, probe) keys missing from
the store are scored, in chunks committed one transaction at a time, so a
rerun after a crash picks up where the last whole chunk ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from curation.pipeline.chunk_scoring import (
    ScoredItem,
    ScoreSettings,
    generation_id,
    generation_settings,
    pool_digest,
    score_chunk_safely,
    settings_digest,
)
from curation.pipeline.quarantine import reused_id_row, set_aside
from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from curation.pipeline.store import GenerationRow, ScoreRow
from probes.chat import ThinkingFormat, render_generation_prompt
from probes.models import LoadedModel, context_limit, model_hidden_size
from probes.refusal import RefusalProbe


class ScoreSink(Protocol):
    """Where scoring writes: the DuckDB ``Store``, or a Parquet shard (``curation.pipeline.shards``)."""

    def start_run(self, run_id: str, kind: str, params: dict[str, Any], model_fingerprint: str | None = None,
                  probe_id: str | None = None) -> None: ...
    def finish_run(self, run_id: str, counts: dict[str, Any], status: str = "done") -> None: ...
    def add_examples(self, records: Sequence[CandidateRecord]) -> int: ...
    def unscored_ids(self, ids: Sequence[str], model_fingerprint: str, probe_id: str, need_verdict: bool = False,
                     settings_sha256: str = "") -> list[str]: ...
    def add_scores(self, rows: Sequence[ScoreRow], replace: bool = False) -> None: ...
    def add_quarantine(self, rows: Iterable[QuarantinedRow], run_id: str | None) -> int: ...
    def reused_ids(self, records: Sequence[CandidateRecord]) -> dict[str, str]: ...
    def stored_generations(self, generation_ids: Sequence[str]) -> dict[str, GenerationRow]: ...
    def add_generations(self, rows: Sequence[GenerationRow]) -> None: ...
    def release(self) -> None: ...


@dataclass
class ScoreSummary:
    run_id: str
    n_candidates: int
    n_new_examples: int
    n_already_scored: int
    n_scored: int
    n_unclosed: int
    n_over_context: int = 0  # quarantined: prompt plus generation budget exceed the model's context
    # Rows quarantined in this run, for any reason (unreadable, over the context, an id reused for other
    # content, scoring failed), and how many of them the store had not recorded before.
    n_quarantined: int = 0
    n_quarantined_new: int = 0
    n_generated: int = 0  # prompts the model generated for in this run
    n_reused_generations: int = 0  # scored rows read from a generation stored earlier or shared with another row
    settings_sha256: str = ""  # the generation settings this run scored under: its pool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PendingChunk:
    """Rows to score, how many input rows they stood for, and the stored generations they can reuse."""

    records: list[CandidateRecord]
    n_raw: int
    cached: dict[str, GenerationRow] = field(default_factory=dict)


class ScoringEngine(Protocol):
    """Turns a stream of pending chunks into score rows. Each item in is
    (pending records, how many input rows the chunk stood for); each item out
    is (that count, the chunk's score rows and quarantined rows), in any order."""

    def score(self, chunks: Iterable[PendingChunk], run_id: str) -> Iterator[tuple[int, list[ScoredItem]]]: ...


@dataclass
class LocalEngine:
    """Scores in this process, one chunk at a time."""

    lm: LoadedModel
    probe: RefusalProbe
    fmt: ThinkingFormat
    settings: ScoreSettings

    def score(self, chunks: Iterable[PendingChunk], run_id: str) -> Iterator[tuple[int, list[ScoredItem]]]:
        for chunk in chunks:
            yield chunk.n_raw, (score_chunk_safely(self.lm, self.probe, chunk.records, self.fmt, self.settings, run_id,
                                                   chunk.cached) if chunk.records else [])


def score_records(
    lm: LoadedModel,
    probe: RefusalProbe,
    store: ScoreSink,
    records: Iterable[CandidateRecord | QuarantinedRow],
    fmt: ThinkingFormat,
    settings: ScoreSettings,
    *,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    engine: ScoringEngine | None = None,
    inputs: Sequence[dict[str, Any]] = (),
) -> ScoreSummary:
    """Score every record not yet scored with this model and probe.

    ``records`` may be a stream, and may hold rows the reader quarantined (they
    are recorded with this run's id as they pass): it is consumed ``chunk_size`` at a time; each
    chunk's new examples are stored, its unscored rows go to the engine, and
    its score rows are committed in one transaction, so memory does not grow
    with the pool and a killed job loses at most the chunks in flight.
    ``inputs`` (path, sha256 of each source file) go into the run's record, for the slice's card.
    ``lm`` may be a weightless shell (``load_model_shell``) when the engine
    holds the real model elsewhere (Ray actors).
    """
    probe.check_model(lm.fingerprint, model_hidden_size(lm))
    check_budget(lm, fmt, settings)
    engine = engine or LocalEngine(lm, probe, fmt, settings)
    run_id = run_id or uuid.uuid4().hex[:12]
    gen_settings = generation_settings(lm, fmt, settings)
    gen_sha, pool_sha = settings_digest(gen_settings), pool_digest(gen_settings)
    store.start_run(run_id, "score", {"settings": settings.__dict__, "generation_settings": gen_settings,
                                      "generation_settings_sha256": pool_sha, "engine": type(engine).__name__,
                                      "inputs": list(inputs), "completion_format": completion_format(lm, fmt),
                                      # What generated (not part of any key: rows from either generator are interchangeable).
                                      "generator": lm.generator.describe() if lm.generator is not None else {"generator": "hf"}},
                    lm.fingerprint, probe.probe_id)
    counts = {"candidates": 0, "new_examples": 0, "already_scored": 0, "scored": 0, "unclosed": 0, "over_context": 0,
              "quarantined": 0, "quarantined_new": 0, "generated": 0, "reused_generations": 0}
    status = "failed"

    def quarantine(rows: list[QuarantinedRow]) -> None:
        counts["quarantined_new"] += store.add_quarantine(rows, run_id)
        counts["quarantined"] += len(rows)

    def pending_chunks() -> Iterator[PendingChunk]:
        for items in _chunks(records, settings.chunk_size):
            unreadable = [r for r in items if isinstance(r, QuarantinedRow)]
            if unreadable:
                quarantine(unreadable)
            raw_chunk = [r for r in items if isinstance(r, CandidateRecord)]
            counts["candidates"] += sum(1 for r in raw_chunk if not r.repeat)
            reused = store.reused_ids(raw_chunk)
            if reused:
                quarantine([reused_id_row(r, reused[r.source_id]) for r in raw_chunk if r.source_id in reused])
                raw_chunk = [r for r in raw_chunk if r.source_id not in reused]
            fresh, too_long = _within_context(lm, [r for r in raw_chunk if not r.repeat], fmt, settings)
            if too_long:
                quarantine(too_long)
                counts["over_context"] += len(too_long)
            long_ids = {r.id for r in raw_chunk if not r.repeat} - {r.id for r in fresh}
            counts["new_examples"] += store.add_examples([r for r in raw_chunk if r.id not in long_ids])
            unique = list({r.id: r for r in fresh}.values())
            pending_ids = set(store.unscored_ids([r.id for r in unique], lm.fingerprint, probe.probe_id,
                                                 need_verdict=settings.judge_answers, settings_sha256=pool_sha))
            pending = [r for r in unique if r.id in pending_ids]
            counts["already_scored"] += len(fresh) - len(pending)
            cached = store.stored_generations([generation_id(r.prompt, lm.fingerprint, gen_sha) for r in pending])
            store.release()  # readers may use the store while this chunk is generated
            yield PendingChunk(pending, len(items), cached)

    try:
        for n_raw, items in engine.score(pending_chunks(), run_id):
            rows = [r for r in items if isinstance(r, ScoreRow)]
            failed = [r for r in items if isinstance(r, QuarantinedRow)]
            made = list({r.generation_id: r for r in items if isinstance(r, GenerationRow)}.values())
            if failed:
                quarantine(failed)
            if made:
                store.add_generations(made)
                counts["generated"] += len(made)
            fresh_ids = {g.generation_id for g in made}
            counts["reused_generations"] += len(rows) - len(fresh_ids & {r.generation_id for r in rows})
            if rows:
                counts["unclosed"] += sum(1 for r in rows if not r.closed)
                store.add_scores(rows, replace=settings.judge_answers)
                counts["scored"] += len(rows)
            store.release()
            if progress is not None:
                progress(n_raw)
        status = "done"
    finally:
        store.finish_run(run_id, dict(counts), status)
        store.release()
    return ScoreSummary(run_id, counts["candidates"], counts["new_examples"], counts["already_scored"], counts["scored"],
                        counts["unclosed"], counts["over_context"], counts["quarantined"], counts["quarantined_new"],
                        counts["generated"], counts["reused_generations"], pool_sha)


def _chunks(items: Iterable[CandidateRecord | QuarantinedRow], size: int) -> Iterator[list[CandidateRecord | QuarantinedRow]]:
    chunk: list[CandidateRecord | QuarantinedRow] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BudgetSettingsError(ValueError):
    """The generation budgets cannot fit the model's context for any prompt: a bad setting,
    not a bad row, so nothing is quarantined."""


def check_budget(lm: LoadedModel, fmt: ThinkingFormat, settings: ScoreSettings) -> None:
    """Refuse, before anything is generated or quarantined, budgets that leave no room for a prompt:
    the template's own tokens around the shortest user text plus --max-new-tokens (and --answer-tokens
    with --judge-answers) must fit the model's context. Rows are only set aside for their own length."""
    limit = context_limit(lm)
    if limit is None:
        return
    overhead = len(lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, "?", fmt), add_special_tokens=False))
    answer = settings.answer_tokens if settings.judge_answers else 0
    if overhead + settings.max_new_tokens + answer <= limit:
        return
    flags = f"--max-new-tokens {settings.max_new_tokens}" + (f" + --answer-tokens {answer}" if answer else "")
    room = limit - overhead - answer
    raise BudgetSettingsError(
        f"{flags} does not fit the model's context of {limit} tokens (max_position_embeddings in {lm.path}/config.json): "
        f"the chat template alone takes {overhead} tokens, so even an empty prompt would be set aside. "
        + (f"Lower --max-new-tokens to at most {room} (less the longest prompt's tokens)." if room > 0
           else "Lower --answer-tokens and --max-new-tokens.") + " Nothing was generated or quarantined.")


def completion_format(lm: LoadedModel, fmt: ThinkingFormat) -> dict[str, Any]:
    """What every later verb needs to read this run's completions as the model wrote them: the
    family, its thinking format (markers, separators, template arguments) and the end tokens."""
    from probes.families import UnsupportedModelError, family_of

    try:
        family: str | None = family_of(lm.model).name
    except UnsupportedModelError:
        family = None
    return {"family": family, "thinking": asdict(fmt), "end_tokens": list(lm.end_tokens)}


def _within_context(
    lm: LoadedModel, chunk: list[CandidateRecord], fmt: ThinkingFormat, settings: ScoreSettings
) -> tuple[list[CandidateRecord], list[QuarantinedRow]]:
    """Split off records whose rendered prompt plus the generation budget does not fit the model."""
    limit = context_limit(lm)
    if limit is None:
        return chunk, []
    budget = settings.max_new_tokens + (settings.answer_tokens if settings.judge_answers else 0)
    keep, over = [], []
    for record in chunk:
        n = len(lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, record.prompt, fmt), add_special_tokens=False))
        if n + budget > limit:
            over.append(set_aside(record, f"prompt over the context limit: {n} tokens + {budget} to generate > {limit}"))
        else:
            keep.append(record)
    return keep, over
