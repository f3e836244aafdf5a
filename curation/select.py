"""Selection: budget parsing, strategies, and export of the chosen slice as
training pairs with a manifest that says exactly how it was made."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from curation.sources import split_response
from curation.store import Store
from probes.chat import ThinkingFormat

# cliff: top MS. random: seeded sample. full: everything. Baselines from the
# source paper: low-final (lowest final score I′ only: what its public ranking
# script sorts by), plateau (highest plateau I only), rule (examples whose own
# answer the keyword judge did not call a refusal, sampled to the budget).
Strategy = Literal["cliff", "random", "full", "low-final", "plateau", "rule"]
STRATEGIES: tuple[str, ...] = ("cliff", "random", "full", "low-final", "plateau", "rule")
_ORDER_BY = {
    "cliff": "misalignment DESC, example_id",
    "low-final": "final ASC, example_id",
    "plateau": "plateau DESC, example_id",
}
TargetMode = Literal["own-reasoning", "candidate"]


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    """A budget as the user wrote it, resolved against a pool size by ``count``."""

    text: str
    fraction: float | None = None
    absolute: int | None = None

    def count(self, n_pool: int) -> int:
        if n_pool <= 0:
            raise BudgetError("the pool is empty: nothing has been scored for this model and probe")
        if self.absolute is not None:
            if self.absolute > n_pool:
                raise BudgetError(f"--budget {self.text} asks for {self.absolute} examples but the pool has only {n_pool}")
            return self.absolute
        assert self.fraction is not None
        # Round half up, and never to zero: 1.7% of 50 still selects one example.
        return max(1, math.floor(self.fraction * n_pool + 0.5))


def parse_budget(text: str) -> Budget:
    """``1.7%`` (percent), ``0.017`` (fraction, needs a decimal point), ``500`` (count)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1])
            if not 0 < value <= 100:
                raise BudgetError(f"--budget {raw}: a percentage must be above 0% and at most 100%")
            return Budget(raw, fraction=value / 100)
        if any(c in raw for c in ".eE"):
            value = float(raw)
            if not 0 < value <= 1:
                raise BudgetError(f"--budget {raw}: a fraction must be above 0 and at most 1 (write 50% or a count)")
            return Budget(raw, fraction=value)
        count = int(raw)
    except ValueError:
        raise BudgetError(f"--budget {raw!r} is not a percentage (1.7%), a fraction (0.017) or a count (500)") from None
    if count <= 0:
        raise BudgetError(f"--budget {raw}: a count must be at least 1")
    return Budget(raw, absolute=count)


@dataclass
class SelectionManifest:
    strategy: str
    budget: str
    seed: int
    n_pool: int
    n_selected: int
    model_fingerprint: str
    probe_id: str
    target: str
    db: str
    scores_hash: str  # hash of the (example_id, misalignment) rows the selection read
    ids: list[str]
    output: str
    output_sha256: str
    created_at: str


def choose_pair(store: Store, model_fingerprint: str | None, probe_id: str | None) -> tuple[str, str]:
    """The (model, probe) whose scores to select from: as given, or the most
    recently scored pair; ambiguity in what was given is an error."""
    keys = store.score_keys()
    if not keys:
        raise BudgetError(f"{store.path} holds no scores; run curate score first")
    matches = [k for k in keys if (model_fingerprint in (None, k[0])) and (probe_id in (None, k[1]))]
    if not matches:
        raise BudgetError(f"no scores for model {model_fingerprint} / probe {probe_id} in {store.path}")
    return matches[0][0], matches[0][1]


def select_ids(store: Store, strategy: str, budget: Budget, seed: int, model_fingerprint: str, probe_id: str) -> tuple[list[str], int, str]:
    """(chosen ids in rank order, pool size, hash of the rows read)."""
    if strategy not in STRATEGIES:
        raise BudgetError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not store.score_keys():
        raise BudgetError(f"{store.path} holds no scores; run curate score first")
    pool = store.scored_pool(model_fingerprint, probe_id)
    rows = pool.order("example_id").project("example_id, misalignment, plateau, final, answer_verdict").fetchall()
    n_pool = len(rows)
    digest = hashlib.sha256()
    for example_id, ms, plateau, final, verdict in rows:
        digest.update(f"{example_id}:{ms:.9g}:{plateau:.9g}:{final:.9g}:{verdict};".encode())
    n = n_pool if strategy == "full" else budget.count(n_pool)
    rng = np.random.default_rng(seed)
    if strategy in _ORDER_BY:
        ids = [r[0] for r in pool.order(_ORDER_BY[strategy]).limit(n).project("example_id").fetchall()]
    elif strategy == "random":
        ids = [rows[i][0] for i in sorted(rng.choice(n_pool, size=n, replace=False))]
    elif strategy == "rule":
        if any(r[4] is None for r in rows):
            raise BudgetError("--strategy rule needs the model's own answers: score with --judge-answers")
        eligible = [r[0] for r in rows if r[4] != "refusal"]
        take = min(n, len(eligible))  # fewer eligible than the budget: all of them (the manifest says so)
        ids = [eligible[i] for i in sorted(rng.choice(len(eligible), size=take, replace=False))] if take else []
    else:
        ids = [r[0] for r in rows]
    return ids, n_pool, digest.hexdigest()[:16]


def export_selection(
    store: Store,
    out: str | Path,
    *,
    strategy: str,
    budget_text: str,
    seed: int = 0,
    target: TargetMode = "own-reasoning",
    fmt: ThinkingFormat | None = None,
    model_fingerprint: str | None = None,
    probe_id: str | None = None,
) -> SelectionManifest:
    """Write the selected training pairs (jsonl) and ``<out>.manifest.json``.

    Each pair's target is, by default, the model's own reasoning as scored, then
    the close marker, then the candidate's safe answer (the source paper's
    recipe); ``target="candidate"`` keeps the candidate's own response.
    """
    fmt = fmt or ThinkingFormat()
    budget = parse_budget(budget_text)
    fp, pid = choose_pair(store, model_fingerprint, probe_id)
    ids, n_pool, scores_hash = select_ids(store, strategy, budget, seed, fp, pid)
    rows = {
        r[0]: r
        for r in store.scored_pool(fp, pid)
        .project("example_id, prompt, response, category, source, misalignment, reasoning")
        .fetchall()
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for rank, example_id in enumerate(ids):
            _, prompt, response, category, source, ms, own_reasoning = rows[example_id]
            cand_reasoning, answer = split_response(response, fmt)
            reasoning = own_reasoning if target == "own-reasoning" else cand_reasoning
            record = {
                "id": example_id,
                "prompt": prompt,
                "reasoning": reasoning,
                "answer": answer,
                "category": category,
                "source": source,
                "misalignment": ms,
                "rank": rank,
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    manifest = SelectionManifest(
        strategy=strategy,
        budget=budget.text,
        seed=seed,
        n_pool=n_pool,
        n_selected=len(ids),
        model_fingerprint=fp,
        probe_id=pid,
        target=target,
        db=str(store.path),
        scores_hash=scores_hash,
        ids=ids,
        output=str(out),
        output_sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest_path = manifest_path_for(out)
    tmp_manifest = manifest_path.with_name(manifest_path.name + f".tmp{os.getpid()}")
    tmp_manifest.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(tmp_manifest, manifest_path)
    return manifest


def manifest_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")
