"""Scoring one chunk of candidates: the generation keys, and the work both engines
(local and Ray) run per chunk, so a chunk is scored identically on either.

A generation is keyed by (prompt, model fingerprint, digest of the generation
settings); a pool of scores by (model, probe, the settings less the answer-only
ones). ``score_chunk`` generates only what no stored generation covers, once per
distinct prompt, and reads each distinct generation with the probe once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from curation.pipeline.quarantine import failed_row, is_finite, non_finite_row
from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from curation.pipeline.store import GenerationRow, ScoreRow
from probes.chat import ThinkingFormat, split_completion
from probes.cliff import cliff_metrics
from probes.forward import probe_traces
from probes.generate import Generation, generate, reasoning_span
from probes.models import LoadedModel
from probes.refusal import RefusalProbe
from training.judges import DEFAULT_JUDGE, make_judge


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
    judge: str = DEFAULT_JUDGE  # who reads those answers (training.judges.make_judge)


# A row that could not be scored comes back quarantined, with its reason; a generation made for a
# chunk comes back too, to be stored.
ScoredItem = ScoreRow | QuarantinedRow | GenerationRow


def generation_settings(lm: LoadedModel, fmt: ThinkingFormat, settings: ScoreSettings) -> dict[str, Any]:
    """Everything that shapes a generation besides the prompt and the weights: the budget, whether it
    runs through the answer, the decoding, the format (markers, template arguments, system prompt) and
    the dtype. Its digest is part of every generation's key."""
    return {
        "max_new_tokens": settings.max_new_tokens,
        "answer_tokens": settings.answer_tokens if settings.judge_answers else 0,
        "through_answer": settings.judge_answers,
        "sampling": asdict(lm.sampling),
        "format": asdict(fmt),
        "dtype": str(next(iter(lm.model.parameters())).dtype).removeprefix("torch."),
    }


def settings_digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


# Settings that change how far a generation runs past the reasoning but not the reasoning's trace
# (which ends at --max-new-tokens either way): they key generations, not pools, so a later run with
# --judge-answers fills verdicts into the pool scored without them.
_ANSWER_ONLY = ("answer_tokens", "through_answer")


def pool_digest(values: dict[str, Any]) -> str:
    """The digest that names a pool of scores: the generation settings less the answer-only ones."""
    return settings_digest({k: v for k, v in values.items() if k not in _ANSWER_ONLY})


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


def generation_id(prompt: str, model_fingerprint: str, settings_sha256: str) -> str:
    h = hashlib.sha256()
    for part in (prompt_sha256(prompt), model_fingerprint, settings_sha256):
        h.update(part.encode())
        h.update(b"\x1f")
    return h.hexdigest()[:24]


def score_chunk_safely(
    lm: LoadedModel,
    probe: RefusalProbe,
    chunk: Sequence[CandidateRecord],
    fmt: ThinkingFormat,
    settings: ScoreSettings,
    run_id: str,
    cached: Mapping[str, GenerationRow] | None = None,
) -> list[ScoredItem]:
    """``score_chunk``, but a failure never loses the chunk: it is scored again one row at a
    time, and each row that still fails comes back quarantined with the error as its reason.
    A row whose trace is not finite comes back quarantined too, never as a score."""
    from probes.remote_generate import GeneratorUnavailable

    try:
        scored: list[ScoredItem] = list(score_chunk(lm, probe, chunk, fmt, settings, run_id, cached))
    except GeneratorUnavailable:
        raise  # the server is gone: no row is to blame, so none is quarantined; the run stops and a rerun resumes
    except Exception as exc:  # noqa: BLE001 - find the row that broke it; the others are scored
        if len(chunk) == 1:
            return [failed_row(chunk[0], exc)]
        scored = []
        for record in chunk:
            try:
                scored.extend(score_chunk(lm, probe, [record], fmt, settings, run_id, cached))
            except GeneratorUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001
                scored.append(failed_row(record, exc))
    by_id = {r.id: r for r in chunk}
    return [non_finite_row(by_id[r.example_id]) if isinstance(r, ScoreRow) and not is_finite(r) else r for r in scored]


def score_chunk(
    lm: LoadedModel,
    probe: RefusalProbe,
    chunk: Sequence[CandidateRecord],
    fmt: ThinkingFormat,
    settings: ScoreSettings,
    run_id: str,
    cached: Mapping[str, GenerationRow] | None = None,
) -> list[ScoreRow | GenerationRow]:
    """Score rows for ``chunk``, and the generations made for it. A prompt is generated once
    however many rows share it, and not at all when ``cached`` holds its generation under these
    settings; each distinct generation is read by the probe once."""
    gen_settings = generation_settings(lm, fmt, settings)
    gen_sha = settings_digest(gen_settings)
    keys = [generation_id(r.prompt, lm.fingerprint, gen_sha) for r in chunk]
    cached = dict(cached or {})
    stored: dict[str, Generation] = {k: _as_generation(g) for k, g in cached.items() if k in set(keys)}
    to_make = list({k: r.prompt for k, r in zip(keys, chunk, strict=True) if k not in stored}.items())
    made: list[GenerationRow] = []
    if to_make:
        budget = settings.max_new_tokens + (settings.answer_tokens if settings.judge_answers else 0)
        gens = generate(lm, [p for _, p in to_make], fmt, max_new_tokens=budget, batch_size=settings.batch_size,
                        stop_at_close=not settings.judge_answers)
        settings_json = json.dumps(gen_settings, sort_keys=True)
        for (key, prompt), g in zip(to_make, gens, strict=True):
            stored[key] = g
            made.append(GenerationRow(key, prompt_sha256(prompt), lm.fingerprint,
                                      gen_sha, settings_json, list(g.prompt_ids), list(g.generated_ids), g.text, g.close_index,
                                      run_id))
    distinct = list(dict.fromkeys(keys))
    close_ids = lm.tokenizer.encode(fmt.before_close + fmt.close_marker, add_special_tokens=False)
    spans = {k: reasoning_span(stored[k], close_ids, settings.max_new_tokens) for k in distinct}
    traces = dict(zip(distinct, probe_traces(lm, probe, [spans[k].sequence for k in distinct], [spans[k].span for k in distinct],
                                             batch_size=settings.batch_size), strict=True))
    judge = make_judge(settings.judge) if settings.judge_answers else None
    ends = lm.end_tokens
    splits = [split_completion(stored[key].text, fmt, ends) for key in keys]
    verdicts = judge.judge_pairs([r.prompt for r in chunk], [s.answer for s in splits]) if judge else [None] * len(chunk)
    rows: list[ScoreRow | GenerationRow] = []
    for record, key, split, verdict in zip(chunk, keys, splits, verdicts, strict=True):
        g, span, trace = stored[key], spans[key], traces[key]
        rows.append(
            ScoreRow(
                example_id=record.id,
                model_fingerprint=lm.fingerprint,
                probe_id=probe.probe_id,
                metrics=cliff_metrics(trace, settings.smoothing_window),
                closed=span.closed,
                reasoning=split.reasoning if span.closed else lm.tokenizer.decode(g.generated_ids[: settings.max_new_tokens]),
                trace=[float(x) for x in trace],
                run_id=run_id,
                answer_verdict=verdict,
                generation_id=key,
                settings_sha256=pool_digest(gen_settings),
            )
        )
    return rows + made


def _as_generation(row: GenerationRow) -> Generation:
    return Generation(prompt_text="", prompt_ids=list(row.prompt_ids), generated_ids=list(row.generated_ids), text=row.text,
                      close_index=row.close_index)
