"""The scoring job: the model's own reasoning for each candidate prompt, the
probe's per-token refusal trace over it, cliff metrics, one store row each.

Incremental by construction: only (example, model, probe) keys missing from
the store are scored, in chunks committed one transaction at a time, so a
rerun after a crash picks up where the last whole chunk ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from curation.sources import CandidateRecord
from curation.store import ScoreRow, Store
from probes.chat import ThinkingFormat, split_completion
from probes.cliff import cliff_metrics
from probes.forward import probe_traces
from probes.generate import generate, reasoning_span
from probes.models import LoadedModel, model_hidden_size
from probes.refusal import RefusalProbe
from training.judge import SubstringJudge


@dataclass(frozen=True)
class ScoreSettings:
    max_new_tokens: int = 128
    batch_size: int = 16
    chunk_size: int = 64  # examples per committed transaction
    smoothing_window: int = 3
    # Generate through the answer and store the judge's verdict on it (the
    # rule-based baseline needs it); costs the answer's tokens.
    judge_answers: bool = False
    answer_tokens: int = 96


@dataclass
class ScoreSummary:
    run_id: str
    n_candidates: int
    n_new_examples: int
    n_already_scored: int
    n_scored: int
    n_unclosed: int


def score_records(
    lm: LoadedModel,
    probe: RefusalProbe,
    store: Store,
    records: Iterable[CandidateRecord],
    fmt: ThinkingFormat,
    settings: ScoreSettings,
    *,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ScoreSummary:
    """Score every record not yet scored with this model and probe.

    ``records`` may be a stream: it is consumed ``chunk_size`` at a time and
    each chunk is stored, scored and committed before the next is read, so
    memory does not grow with the pool.
    """
    probe.check_model(lm.fingerprint, model_hidden_size(lm))
    run_id = run_id or uuid.uuid4().hex[:12]
    store.start_run(run_id, "score", {"settings": settings.__dict__, "format": fmt.close_marker}, lm.fingerprint, probe.probe_id)
    n_candidates = n_new = already = n_scored = n_unclosed = 0
    status = "failed"
    try:
        for chunk in _chunks(records, settings.chunk_size):
            n_candidates += len(chunk)
            n_new += store.add_examples(chunk)
            pending_ids = set(
                store.unscored_ids([r.id for r in chunk], lm.fingerprint, probe.probe_id, need_verdict=settings.judge_answers)
            )
            pending = [r for r in chunk if r.id in pending_ids]
            already += len(chunk) - len(pending)
            if pending:
                rows = _score_chunk(lm, probe, pending, fmt, settings, run_id)
                n_unclosed += sum(1 for r in rows if not r.closed)
                store.add_scores(rows, replace=settings.judge_answers)
                n_scored += len(rows)
            if progress is not None:
                progress(len(chunk))
        status = "done"
    finally:
        store.finish_run(
            run_id,
            {"candidates": n_candidates, "new_examples": n_new, "already_scored": already, "scored": n_scored, "unclosed": n_unclosed},
            status,
        )
    return ScoreSummary(run_id, n_candidates, n_new, already, n_scored, n_unclosed)


def _chunks(items: Iterable[CandidateRecord], size: int) -> Iterator[list[CandidateRecord]]:
    chunk: list[CandidateRecord] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _score_chunk(
    lm: LoadedModel,
    probe: RefusalProbe,
    chunk: Sequence[CandidateRecord],
    fmt: ThinkingFormat,
    settings: ScoreSettings,
    run_id: str,
) -> list[ScoreRow]:
    budget = settings.max_new_tokens + (settings.answer_tokens if settings.judge_answers else 0)
    gens = generate(
        lm, [r.prompt for r in chunk], fmt, max_new_tokens=budget, batch_size=settings.batch_size,
        stop_at_close=not settings.judge_answers,
    )
    judge = SubstringJudge()
    close_ids = lm.tokenizer.encode("\n" + fmt.close_marker, add_special_tokens=False)
    scored_spans = [reasoning_span(g, close_ids, settings.max_new_tokens) for g in gens]
    traces = probe_traces(lm, probe, [x.sequence for x in scored_spans], [x.span for x in scored_spans], batch_size=settings.batch_size)
    rows = []
    for record, g, scored, trace in zip(chunk, gens, scored_spans, traces, strict=True):
        split = split_completion(g.text.replace(lm.tokenizer.eos_token or "\0", ""), fmt)
        closed = scored.closed
        rows.append(
            ScoreRow(
                example_id=record.id,
                model_fingerprint=lm.fingerprint,
                probe_id=probe.probe_id,
                metrics=cliff_metrics(trace, settings.smoothing_window),
                closed=closed,
                reasoning=split.reasoning if closed else lm.tokenizer.decode(g.generated_ids[: settings.max_new_tokens]),
                trace=[float(x) for x in trace],
                run_id=run_id,
                answer_verdict=judge.judge(split.answer) if settings.judge_answers else None,
            )
        )
    return rows
