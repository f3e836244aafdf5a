"""The rows scoring sets aside, each with its locator and the reason: an id the
store holds for other content, a trace that is not finite, a row whose scoring
failed. Nothing is dropped silently: each goes to the quarantine table."""

from __future__ import annotations

import math

from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from curation.pipeline.store import ScoreRow


def is_finite(row: ScoreRow) -> bool:
    m = row.metrics
    return all(math.isfinite(v) for v in (m.plateau, m.final, m.misalignment)) and all(math.isfinite(v) for v in row.trace)


def set_aside(record: CandidateRecord, reason: str) -> QuarantinedRow:
    """The record as a quarantined row: where it was read, why, and its prompt."""
    file, line = record.origin or (record.source or "?", 0)
    return QuarantinedRow(file, line, reason, record.prompt[:2000])


def non_finite_row(record: CandidateRecord) -> QuarantinedRow:
    """A trace with NaN or inf (an fp16 overflow, a broken checkpoint) is never stored as a score."""
    return set_aside(record, "non-finite probe trace (NaN or inf): an fp16 overflow or a broken checkpoint?")


def reused_id_row(record: CandidateRecord, other: str) -> QuarantinedRow:
    return set_aside(record, f"id '{record.source_id}' already names other content in the store (example {other})")


def failed_row(record: CandidateRecord, exc: BaseException) -> QuarantinedRow:
    return set_aside(record, f"scoring failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
