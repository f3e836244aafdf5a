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


def non_finite_row(inflight: dict[str, CandidateRecord], row: ScoreRow) -> QuarantinedRow:
    """A trace with NaN or inf (an fp16 overflow, a broken checkpoint) is never stored as a score."""
    record = inflight.get(row.example_id)
    if record is not None and record.origin:
        file, line = record.origin
    else:
        file, line = (record.source if record else None) or row.example_id, 0
    return QuarantinedRow(file, line, "non-finite probe trace (NaN or inf): an fp16 overflow or a broken checkpoint?",
                          record.prompt[:2000] if record else row.example_id)


def reused_id_row(record: CandidateRecord, other: str) -> QuarantinedRow:
    file, line = record.origin or (record.source or "?", 0)
    return QuarantinedRow(file, line, f"id '{record.source_id}' already names other content in the store (example {other})",
                          record.prompt[:2000])


def failed_row(record: CandidateRecord, exc: BaseException) -> QuarantinedRow:
    file, line = record.origin or (record.source or "?", 0)
    text = " ".join(str(exc).split())[:300]
    return QuarantinedRow(file, line, f"scoring failed: {type(exc).__name__}: {text}", record.prompt[:2000])
