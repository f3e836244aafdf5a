"""Selection: budget parsing, strategies, and export of the chosen slice as
training pairs with a manifest that says exactly how it was made."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from curation.pipeline.slice_out import card_path, content_sha256, removed_on_failure, slice_records, write_card, write_slice
from curation.pipeline.store import Store
from probes.chat import ThinkingFormat
from probes.files import write_json_atomic

# cliff: top MS. random: seeded sample. full: everything. Baselines from the
# source paper: low-final (lowest final score I′ only: what its public ranking
# script sorts by), plateau (highest plateau I only), rule (examples whose own
# answer the keyword judge did not call a refusal, sampled to the budget).
Strategy = Literal["cliff", "random", "full", "low-final", "plateau", "rule"]
STRATEGIES: tuple[str, ...] = ("cliff", "random", "full", "low-final", "plateau", "rule")

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
    as_of: str | None = None  # only rows scored by then were read (set by curate run, for exact replays)
    out_format: str = "jsonl"
    card: str | None = None  # the dataset card written beside the slice
    # Unclosed (length-capped) reasoning in the pool? And the rows left out of it, by reason.
    # Manifests written before these fields existed selected with unclosed rows in.
    include_unclosed: bool = False
    left_out: dict[str, int] | None = None
    # The digest of the generation settings the pool was scored under ('' : not recorded);
    # None in manifests written before pools were told apart by settings.
    generation_settings: str | None = None


def choose_pool(store: Store, model_fingerprint: str | None, probe_id: str | None,
                settings_sha256: str | None = None) -> tuple[str, str, str]:
    """The (model, probe, generation settings) whose scores to select from: as given, or the
    most recently scored pool that matches what was given (a prefix of the settings digest will do)."""
    keys = store.score_keys()
    if not keys:
        raise BudgetError(f"{store.path} holds no scores; run curate score first")
    matches = [k for k in keys if (model_fingerprint in (None, k[0])) and (probe_id in (None, k[1]))
               and (settings_sha256 is None or k[2].startswith(settings_sha256))]
    if not matches:
        raise BudgetError(f"no scores for model {model_fingerprint} / probe {probe_id}"
                          + (f" / generation settings {settings_sha256}" if settings_sha256 is not None else "") + f" in {store.path}")
    return matches[0][0], matches[0][1], matches[0][2]


@dataclass(frozen=True)
class Pool:
    rows: list[tuple]  # the chosen rows, in rank order
    n_pool: int
    scores_hash: str  # of the score rows read
    left_out: dict[str, int]  # rows not in the pool, by reason: non_finite, unclosed


def select_rows(store: Store, strategy: str, budget: Budget, seed: int, model_fingerprint: str, probe_id: str,
                as_of: datetime | None = None, include_unclosed: bool = False, settings_sha256: str | None = None) -> Pool:
    """The chosen rows and the pool they came from. Rows with a non-finite score are never in the
    pool; rows whose reasoning hit the length cap only with ``include_unclosed`` (their reasoning
    is cut off, and exporting it as the model's own would teach a truncated trace).

    Everything runs inside DuckDB, so selecting from millions of rows never
    moves the pool into Python: rankings are ``ORDER BY … LIMIT``, and seeded
    sampling orders by ``md5(id:seed)``, which is stable across versions.
    """
    if strategy not in STRATEGIES:
        raise BudgetError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    n_pool, scores_hash, n_missing_verdicts, left_out = store.pool_summary(model_fingerprint, probe_id, as_of, include_unclosed,
                                                                          settings_sha256)
    if n_pool == 0:
        why = f" ({left_out['unclosed']} unclosed rows left out: see --include-unclosed)" if left_out["unclosed"] else ""
        raise BudgetError(f"{store.path} holds no selectable scores for model {model_fingerprint} / probe {probe_id}{why}")
    pick = {"as_of": as_of, "include_unclosed": include_unclosed, "settings_sha256": settings_sha256}
    n = n_pool if strategy == "full" else budget.count(n_pool)
    if strategy in ("cliff", "low-final", "plateau"):
        rows = store.selection(model_fingerprint, probe_id, strategy, n, **pick)
    elif strategy == "random":
        rows = store.selection(model_fingerprint, probe_id, "sample", n, seed=seed, output_order="id", **pick)
    elif strategy == "rule":
        if n_missing_verdicts:
            raise BudgetError("--strategy rule needs the model's own answers: score with --judge-answers")
        # Fewer eligible than the budget: all of them (the manifest's count says so).
        rows = store.selection(model_fingerprint, probe_id, "sample", n, seed=seed, exclude_refusals=True, output_order="id",
                               **pick)
    else:
        rows = store.selection(model_fingerprint, probe_id, "id", n_pool, **pick)
    return Pool(rows, n_pool, scores_hash, left_out)


def select_ids(store: Store, strategy: str, budget: Budget, seed: int, model_fingerprint: str, probe_id: str) -> tuple[list[str], int, str]:
    """Like ``select_rows``, ids only."""
    pool = select_rows(store, strategy, budget, seed, model_fingerprint, probe_id)
    return [r[0] for r in pool.rows], pool.n_pool, pool.scores_hash


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
    as_of: datetime | None = None,
    out_format: str = "jsonl",
    include_unclosed: bool = False,
    settings_sha256: str | None = None,
) -> SelectionManifest:
    """Write the selected training pairs (jsonl, parquet or a saved dataset, ``out_format``),
    its dataset card and ``<out>.manifest.json``.

    Each pair's target is, by default, the model's own reasoning as scored, then
    the close marker, then the candidate's safe answer (the source paper's
    recipe); ``target="candidate"`` keeps the candidate's own response. Non-finite scores are
    never selected; unclosed reasoning only with ``include_unclosed``; the manifest counts both.
    """
    budget = parse_budget(budget_text)
    fp, pid, settings = choose_pool(store, model_fingerprint, probe_id, settings_sha256)
    pool = select_rows(store, strategy, budget, seed, fp, pid, as_of, include_unclosed, settings)
    rows, n_pool, scores_hash = pool.rows, pool.n_pool, pool.scores_hash
    fmt, ends = pool_completion_format(store, fp, settings, fmt, [r[2] for r in rows])
    ids = [r[0] for r in rows]
    out = Path(out)
    # The card's pool quantiles (a DuckDB pass over the whole pool) run beside the Python loop below.
    with ThreadPoolExecutor(max_workers=1) as background:
        quantiles = background.submit(store.misalignment_quantiles, fp, pid, as_of, settings, include_unclosed)
        records = slice_records(rows, fmt, ends, own_reasoning=target == "own-reasoning")
        pool_quantiles = quantiles.result()
    manifest_path = manifest_path_for(out)
    with removed_on_failure(out, card_path(out, out_format), manifest_path):
        write_slice(records, out, out_format)
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
            output_sha256=content_sha256(records),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            as_of=as_of.isoformat() if as_of is not None else None,
            out_format=out_format,
            card=str(card_path(out, out_format)),
            include_unclosed=include_unclosed,
            left_out=pool.left_out,
            generation_settings=settings,
        )
        # Shallow: asdict would deep-copy the id list (seconds for a 1.7% slice of millions of rows).
        manifest_doc = {f.name: getattr(manifest, f.name) for f in fields(manifest)}
        write_card(out, out_format, manifest_doc, records, pool_quantiles,
                   store.score_inputs(fp, pid))
        write_json_atomic(manifest_path, manifest_doc)
        return manifest


class FormatMismatchError(ValueError):
    """The format given on the command line is not the one the pool was scored in."""


def pool_completion_format(store: Store, model_fingerprint: str, settings_sha256: str, given: ThinkingFormat | None,
                           responses: Sequence[str]) -> tuple[ThinkingFormat, tuple[str, ...]]:
    """The (thinking format, end tokens) to read the pool's responses in: the one its scoring run
    recorded in the store. ``given`` (from --model or the marker flags) stands in where the store
    recorded none, and must agree with a recorded one. With neither, the default ``<think>`` split is
    used only where it round-trips: a response written in another family's format is an error."""
    recorded = store.pool_format(model_fingerprint, settings_sha256)
    if recorded is not None:
        fmt = ThinkingFormat(**{k: v for k, v in recorded["thinking"].items() if k in _FORMAT_FIELDS})
        if given is not None and (given.open_marker, given.close_marker, given.after_close) != (
                fmt.open_marker, fmt.close_marker, fmt.after_close):
            raise FormatMismatchError(
                f"the pool (model {model_fingerprint}, settings {settings_sha256[:12]}) was scored in the format "
                f"{fmt.open_marker!r}…{fmt.close_marker!r} ({recorded.get('family') or 'family not recorded'}), but --model / "
                f"--think-open / --think-close give {given.open_marker!r}…{given.close_marker!r}; drop the flags to use the "
                "recorded format, or select the pool that model scored (--model-fingerprint)")
        return fmt, tuple(recorded.get("end_tokens") or ())
    if given is not None:
        return given, ()
    default = ThinkingFormat()
    for family_fmt in _known_formats():
        if family_fmt.close_marker == default.close_marker:
            continue
        hit = next((i for i, r in enumerate(responses) if family_fmt.open_marker in r or family_fmt.after_close.strip() and
                    family_fmt.after_close.strip() in r), None)
        if hit is not None:
            raise FormatMismatchError(
                f"the pool's format is not recorded in {store.path} (scored before it was), and selected response "
                f"{hit + 1} is written in another format ({family_fmt.open_marker!r}…{family_fmt.close_marker!r}), which "
                "the default <think> split would read wrongly; pass --model DIR (the model that scored it)")
    return default, ()


_FORMAT_FIELDS = {f.name for f in fields(ThinkingFormat)}


def _known_formats() -> list[ThinkingFormat]:
    from probes.families import FAMILIES

    return list({(f.thinking.open_marker, f.thinking.close_marker): f.thinking for f in FAMILIES.values()}.values())


def manifest_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")
