"""The selected slice out: jsonl (one training pair a line), parquet, or a saved
Hugging Face dataset, each written atomically, and beside it a dataset card
with its lineage (sources and their hashes, model, probe, strategy, budget,
counts per category, the score distribution and the selection manifest).

The card is Markdown with the YAML header the Hugging Face hub reads: a
``README.md`` inside a saved dataset's folder, ``OUT.README.md`` beside a
jsonl or parquet file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from curation.pipeline.sources import response_parts
from probes.chat import ThinkingFormat
from probes.files import atomic_path, write_text_atomic

OUT_FORMATS = ("jsonl", "parquet", "hf")


def slice_records(rows: Sequence[tuple], fmt: ThinkingFormat, ends: Sequence[str], *,
                  own_reasoning: bool) -> list[dict[str, Any]]:
    """The exported training pairs, in rank order, from ``Store.selection`` rows: each response
    read in the pool's format; the reasoning is the model's own as scored, or the candidate's."""
    records = []
    for rank, (example_id, prompt, response, category, source, ms, scored_reasoning) in enumerate(rows):
        cand_reasoning, answer, other = response_parts(response, fmt, ends)
        records.append({
            "id": example_id,
            "prompt": prompt,
            "reasoning": scored_reasoning if own_reasoning else cand_reasoning,
            "answer": answer,
            "category": category,
            "source": source,
            "misalignment": ms,
            "rank": rank,
            **({"other_messages": other} if other else {}),
        })
    return records


def content_sha256(records: Sequence[dict[str, Any]]) -> str:
    """The slice's digest, the same for every format: SHA-256 of its jsonl bytes (so for jsonl,
    the file's own digest). A saved dataset's files carry a random fingerprint; its rows do not."""
    h = hashlib.sha256()
    for record in records:
        h.update(orjson.dumps(record) + b"\n")
    return h.hexdigest()


@contextmanager
def removed_on_failure(*paths: Path) -> Iterator[None]:
    """Whole or not at all: a signal or a full disk between a slice, its card and its manifest leaves
    none of them (a slice without its manifest can be neither trusted nor reproduced)."""
    try:
        yield
    except BaseException:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def write_slice(records: Sequence[dict[str, Any]], out: Path, out_format: str) -> None:
    """The slice in ``out_format``. A harmony pool's rows may carry ``other_messages`` (tool calls and
    preambles kept beside the pair): a list in JSON lines, a JSON string column in the tabular formats."""
    extra = any("other_messages" in r for r in records) and out_format != "jsonl"
    if extra:
        records = [{**r, "other_messages": orjson.dumps(r.get("other_messages", [])).decode()} for r in records]
    if out_format == "jsonl":
        with atomic_path(out) as tmp, tmp.open("wb") as fh:
            for record in records:
                # orjson: a large slice is mostly encoding time with the standard library.
                fh.write(orjson.dumps(record) + b"\n")
    elif out_format == "parquet":
        import polars as pl

        with atomic_path(out) as tmp:
            schema = {**_polars_schema(), **({"other_messages": pl.String} if extra else {})}
            pl.DataFrame(list(records), schema=schema).write_parquet(tmp)
    elif out_format == "hf":
        from datasets import Dataset, Features, Value

        types = {**_HF_TYPES, **({"other_messages": "string"} if extra else {})}
        features = Features({name: Value(kind) for name, kind in types.items()})
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            Dataset.from_list(list(records), features=features).save_to_disk(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    else:
        raise ValueError(f"--out-format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}")


_HF_TYPES = {"id": "string", "prompt": "string", "reasoning": "string", "answer": "string", "category": "string",
             "source": "string", "misalignment": "float64", "rank": "int64"}


def _polars_schema() -> dict[str, Any]:
    import polars as pl

    return {"id": pl.String, "prompt": pl.String, "reasoning": pl.String, "answer": pl.String, "category": pl.String,
            "source": pl.String, "misalignment": pl.Float64, "rank": pl.Int64}


def card_path(out: Path, out_format: str) -> Path:
    return out / "README.md" if out_format == "hf" else out.with_name(out.name + ".README.md")


def _quantiles(values: Sequence[float]) -> list[float | None]:
    finite = sorted(v for v in values if v == v and abs(v) != float("inf"))
    if not finite:
        return [None] * 5
    return [finite[min(len(finite) - 1, round(q * (len(finite) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]


def _cell(value: Any, limit: int = 200) -> str:
    """A table cell from untrusted text (a category, a file name): one line, no column break, no
    markup or HTML, bounded, so a hostile value cannot reshape the card."""
    text = " ".join(str(value).split())
    text = text[:limit] + ("…" if len(text) > limit else "")
    for raw, safe in (("\\", "\\\\"), ("|", "\\|"), ("`", "'"), ("<", "&lt;"), (">", "&gt;"), ("[", "\\["), ("]", "\\]"),
                      ("*", "\\*"), ("_", "\\_")):
        text = text.replace(raw, safe)
    return text


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in the text, so the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def write_card(out: Path, out_format: str, manifest: dict[str, Any], records: Sequence[dict[str, Any]],
               pool_quantiles: Sequence[float | None], inputs: Sequence[dict[str, Any]]) -> Path:
    """The dataset card; every number in it comes from ``manifest``, the records or the store."""
    per_category = Counter(r.get("category") or "(none)" for r in records)
    selected_q = _quantiles([float(r["misalignment"]) for r in records if r.get("misalignment") is not None])

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    manifest_json = json.dumps({k: v for k, v in manifest.items() if k != "ids"}, indent=2, default=str)
    fence = _fence(manifest_json)
    lines = [
        "---",
        "pretty_name: cliff-curate selection",
        "tags: [safety, refusal-cliff, cliff-curate]",
        f"size_categories: [{_size_category(manifest['n_selected'])}]",
        "---",
        "",
        f"# Safety slice: {manifest['strategy']} at {manifest['budget']}",
        "",
        f"Selected by cliff-curate: {manifest['n_selected']} of {manifest['n_pool']} scored candidates, strategy "
        f"`{manifest['strategy']}`, budget `{manifest['budget']}`, seed {manifest['seed']}, target `{manifest['target']}`.",
        "Each row is a training pair: the prompt, the reasoning (the model's own, as scored, unless the target is "
        "`candidate`), and the safe answer; `misalignment` is the refusal-cliff score MS = I − I′ it was ranked by.",
        "",
        "## Lineage",
        "",
        f"- model fingerprint: `{manifest['model_fingerprint']}`",
        f"- probe id: `{manifest['probe_id']}`",
        f"- store: `{manifest['db']}` (score rows read: hash `{manifest['scores_hash']}`)",
        f"- selected at: {manifest['created_at']}" + (f", from rows scored by {manifest['as_of']}" if manifest.get("as_of") else ""),
        f"- content SHA-256 (jsonl bytes of the rows): `{manifest['output_sha256']}`",
        "",
        "Source files, as hashed when they were scored:",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *[f"| {_cell(i['path'], 400)} | {_cell(i['sha256'])} |" for i in inputs],
        *(["| (not recorded: scored before sources were hashed) | |"] if not inputs else []),
        "",
        "## Counts per category",
        "",
        "| category | rows |",
        "| --- | --- |",
        *[f"| {_cell(name)} | {n} |" for name, n in sorted(per_category.items())],
        "",
        "## Score distribution (misalignment)",
        "",
        "| | min | 25% | median | 75% | max |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| selected ({manifest['n_selected']}) | " + " | ".join(fmt(v) for v in selected_q) + " |",
        f"| pool ({manifest['n_pool']}, quantiles) | " + " | ".join(fmt(v) for v in pool_quantiles) + " |",
        "",
        "## Selection manifest",
        "",
        f"{fence}json",
        manifest_json,
        fence,
        "",
    ]
    path = card_path(out, out_format)
    write_text_atomic(path, "\n".join(lines))
    return path


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"
