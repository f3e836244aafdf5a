"""The Ray Data scoring engine (``curate score --engine ray``; ``pip install
cliff-curate[ray]``).

The driver does what needs the store: it reads and validates the input,
quarantines bad rows, stores new examples and keeps only unscored keys, all a
chunk at a time as the local engine does. Pending chunks become a Ray
Dataset; ``map_batches`` runs them through a pool of actors that each load the
model and the probe once and call the very same ``score_chunk`` the local
engine calls, one whole chunk per call, so a chunk is batched identically on
either engine and yields the same rows. Results stream back to the driver,
which commits each chunk in its own transaction as it arrives, so a killed job
resumes from the committed chunks exactly as a local one does.

The driver holds the pending candidates' text (not the model); on a cluster
(``--ray-address``) the model path must be readable from every worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from curation.pipeline.chunk_scoring import ScoredItem, ScoreSettings, score_chunk_safely
from curation.pipeline.score import PendingChunk
from curation.pipeline.sources import CandidateRecord, QuarantinedRow
from curation.pipeline.store import GenerationRow, ScoreRow
from probes.chat import ThinkingFormat
from probes.cliff import CliffMetrics
from probes.models import Sampling


def _record_to_dict(r: CandidateRecord) -> dict[str, Any]:
    # The origin travels too: a row that fails on an actor is quarantined with its file and line.
    return {"id": r.id, "prompt": r.prompt, "response": r.response, "category": r.category, "source": r.source, "extra": r.extra,
            "origin": list(r.origin) if r.origin else None, "source_id": r.source_id}


def _record_from_dict(d: dict[str, Any]) -> CandidateRecord:
    return CandidateRecord(**{**d, "origin": tuple(d["origin"]) if d.get("origin") else None})


def _row_to_dict(row: ScoreRow) -> dict[str, Any]:
    d = asdict(row)
    d["metrics"] = asdict(row.metrics)
    return d


def _row_from_dict(d: dict[str, Any]) -> ScoredItem:
    if "quarantined" in d:  # a row whose scoring failed on the actor comes back with its reason
        return QuarantinedRow(**d["quarantined"])
    if "generation" in d:  # a generation the actor made, for the driver to store
        return GenerationRow(**d["generation"])
    return ScoreRow(**{**d, "metrics": CliffMetrics(**d["metrics"])})


def _item_to_dict(item: ScoredItem) -> dict[str, Any]:
    if isinstance(item, QuarantinedRow):
        return {"quarantined": asdict(item)}
    if isinstance(item, GenerationRow):
        return {"generation": asdict(item)}
    return _row_to_dict(item)


class ScoringActor:
    """Holds one copy of the model and probe; scores one chunk per call."""

    def __init__(self, model: str, probe: str, fmt: dict[str, Any], settings: dict[str, Any], device: str, dtype: str,
                 trust_remote_code: bool, torch_threads: int | None, sampling: dict[str, Any] | None = None) -> None:
        import torch

        from probes.models import Sampling, load_model
        from probes.refusal import RefusalProbe

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.lm.sampling = Sampling(**(sampling or {}))
        self.probe = RefusalProbe.load_for(probe, self.lm)
        self.fmt = ThinkingFormat(**fmt)
        self.settings = ScoreSettings(**settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out_rows, out_n = [], []
        for payload, cached, run_id, n_raw in zip(batch["chunk"], batch["cached"], batch["run_id"], batch["n_raw"], strict=True):
            records = [_record_from_dict(r) for r in json.loads(payload)]
            stored = {k: GenerationRow(**g) for k, g in json.loads(cached).items()}
            rows = score_chunk_safely(self.lm, self.probe, records, self.fmt, self.settings, str(run_id), stored)
            out_rows.append(json.dumps([_item_to_dict(r) for r in rows]))
            out_n.append(int(n_raw))
        return {"rows": out_rows, "n_raw": out_n}


@dataclass
class RayEngine:
    model: str
    probe: str
    fmt: ThinkingFormat
    settings: ScoreSettings
    address: str | None = None  # None: start (or join) a local Ray instance
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    sampling: Sampling = field(default_factory=lambda: Sampling())

    def score(self, chunks: Iterable[PendingChunk], run_id: str) -> Iterator[tuple[int, list[ScoredItem]]]:
        import ray

        items = []
        for chunk in chunks:
            if chunk.records:
                items.append({"chunk": json.dumps([_record_to_dict(r) for r in chunk.records]), "run_id": run_id,
                              "n_raw": chunk.n_raw, "cached": json.dumps({k: asdict(g) for k, g in chunk.cached.items()})})
            else:
                yield chunk.n_raw, []  # nothing to score: report it at once
        if not items:
            return
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        scored = dataset.map_batches(
            ScoringActor,
            fn_constructor_kwargs={
                "model": self.model, "probe": self.probe, "fmt": asdict(self.fmt), "settings": asdict(self.settings),
                "device": self.device, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code,
                "torch_threads": int(self.cpus_per_actor) if self.gpus_per_actor == 0 else None,
                "sampling": asdict(self.sampling),
            },
            batch_size=1,  # one whole chunk per call: the same batches as the local engine
            concurrency=self.num_actors,
            num_cpus=self.cpus_per_actor,
            num_gpus=self.gpus_per_actor,
            batch_format="default",
        )
        for batch in scored.iter_batches(batch_size=1, batch_format="default"):
            for payload, n_raw in zip(batch["rows"], batch["n_raw"], strict=True):
                yield int(n_raw), [_row_from_dict(d) for d in json.loads(payload)]
