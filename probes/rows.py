"""Rows in, from every format safety teams keep pools in: jsonl, csv, parquet (a
file, a folder of files or a glob) and Hugging Face datasets saved with
``save_to_disk``. One reader for candidates and prompt files alike.

Each row comes back with a locator (file plus line for jsonl and csv, file plus
row number for parquet and datasets) and either its value or the reason it has
none; reading never raises for a row. Everything streams: jsonl and csv a line
at a time, parquet a record batch at a time, datasets from their memory-mapped
Arrow files, so a pool of any size is read in bounded memory.

Column layouts become the canonical fields in ``probes.layouts``.

Lives in ``probes`` because every package reads prompt files and may import
``probes``; nothing here is about models.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CSV_SUFFIXES = {".csv"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
_BATCH = 1024
_BOM = b"\xef\xbb\xbf"
# A row longer than this is quarantined as soon as it is read, before anything tokenises it: one
# 50 MB line would otherwise cost a minute and gigabytes before the context check turned it away.
ROW_BYTES_ENV = "CURATE_MAX_ROW_BYTES"
DEFAULT_MAX_ROW_BYTES = 4 * 1024 * 1024


def max_row_bytes() -> int:
    """The raw row size limit: ``CURATE_MAX_ROW_BYTES`` (bytes) or 4 MiB."""
    text = os.environ.get(ROW_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_ROW_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ROW_BYTES_ENV}={text!r}: expected a number of bytes, e.g. 4194304") from None
    if value < 1024:
        raise ValueError(f"{ROW_BYTES_ENV}={value}: at least 1024 bytes")
    return value
# One csv field may be long (a reasoning trace) but not unbounded.
csv.field_size_limit(min(sys.maxsize, 64 * 1024 * 1024))


@dataclass(frozen=True)
class Row:
    file: str
    locator: int  # 1-based line (jsonl, csv) or row number (parquet, datasets)
    value: Any  # the parsed row; None when it could not be read
    error: str | None  # why it could not be read
    raw: str  # the row as text, for the quarantine


def describe(path: str | Path) -> str:
    return "line" if kind_of(Path(path)) in ("jsonl", "csv") else "row"


def kind_of(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        return "folder"
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def expand(spec: str | Path, flag: str = "--data") -> list[Path]:
    """The files (or saved datasets) a path, a folder or a glob names, in a stable order."""
    text = str(spec)
    if not text.strip():
        raise ValueError(f"{flag} is empty")
    if any(ch in text for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not found:
            raise FileNotFoundError(f"{flag}: no file matches {text}")
        return found
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    if kind_of(path) == "folder":
        # In a folder, data files only: a stray .json (a manifest, a card) is not a pool.
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() != ".json"
                       and not p.name.startswith(".") and kind_of(p) in ("jsonl", "csv", "parquet"))
        if not found:
            raise ValueError(f"{flag} {path} is a directory with no jsonl, csv or parquet file and no saved dataset")
        return found
    return [path]


def iter_rows(spec: str | Path, flag: str = "--data") -> Iterator[Row]:
    for path in expand(spec, flag):
        kind = kind_of(path)
        if kind == "jsonl":
            yield from _jsonl_rows(path)
        elif kind == "csv":
            yield from _csv_rows(path)
        elif kind == "parquet":
            yield from _parquet_rows(path)
        elif kind == "hf":
            yield from _dataset_rows(path)
        else:
            raise ValueError(f"{flag} {path}: unknown format (use .jsonl/.ndjson, .csv, .parquet or a saved dataset folder)")


def parse_json_line(raw: str) -> tuple[Any, str | None]:
    """The JSON value of one line, or why it has none. Every failure is a reason, never an
    exception: JSON nested past the recursion limit, a number past the integer digit limit."""
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"unreadable JSON value: {' '.join(str(exc).split())[:200]}"


def _oversized(fh: Any, head: bytes, limit: int) -> int:
    """Skip the rest of a line longer than the limit, in bounded chunks; its full size in bytes."""
    size = len(head)
    while not head.endswith(b"\n"):
        head = fh.readline(1024 * 1024)
        if not head:
            break
        size += len(head)
    return size


def _jsonl_rows(path: Path) -> Iterator[Row]:
    limit = max_row_bytes()
    with path.open("rb") as fh:
        lineno = 0
        while True:
            line = fh.readline(limit + 1)
            if not line:
                return
            lineno += 1
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]  # a byte-order mark is an encoding detail, not part of row 1
            if len(line.rstrip(b"\r\n")) > limit:
                size = _oversized(fh, line, limit)
                yield Row(str(path), lineno, None, f"row is {size} bytes, over the {limit}-byte limit "
                          f"({ROW_BYTES_ENV} raises it)", line[:2000].decode("utf-8", "replace"))
                continue
            raw_bytes = line.rstrip(b"\r\n")
            if not raw_bytes.strip():
                continue
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(str(path), lineno, None, f"not UTF-8 ({exc.reason} at byte {exc.start})",
                          raw_bytes.decode("utf-8", "replace"))
                continue
            value, error = parse_json_line(raw)
            yield Row(str(path), lineno, value, error, raw)


def _csv_rows(path: Path) -> Iterator[Row]:
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in that row only, found below.
    limit = max_row_bytes()
    # utf-8-sig: a byte-order mark is stripped instead of becoming part of the first column's name.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(str(path), start, None, f"malformed CSV: {exc}", "")
                continue
            raw = ",".join(str(v) for v in row.values())
            if len(raw) > limit:
                yield Row(str(path), start, None, f"row is {len(raw)} characters, over the {limit}-byte limit "
                          f"({ROW_BYTES_ENV} raises it)", raw[:2000].encode("utf-8", "replace").decode("utf-8"))
                continue
            if any(isinstance(v, str) and has_surrogate(v) for v in row.values()) or None in row:
                why = "not UTF-8" if None not in row else "more fields than the header"
                yield Row(str(path), start, None, why, raw.encode("utf-8", "replace").decode("utf-8"))
                continue
            yield Row(str(path), start, dict(row), None, raw)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    n = 0
    for batch in parquet.iter_batches(batch_size=_BATCH):
        for record in batch.to_pylist():
            n += 1
            yield Row(str(path), n, record, None, _as_text(record))


def _dataset_rows(path: Path) -> Iterator[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, DatasetDict) else [(None, loaded)]
    for split, ds in splits:
        assert isinstance(ds, Dataset)
        name = f"{path}[{split}]" if split is not None else str(path)
        n = 0
        for batch in ds.iter(batch_size=_BATCH):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                n += 1
                record = {c: batch[c][i] for c in columns}
                yield Row(name, n, record, None, _as_text(record))


def _as_text(record: Any) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, default=str)[:100_000]
    except (TypeError, ValueError):
        return repr(record)[:100_000]


def has_surrogate(text: str) -> bool:
    """Valid in a Python string (a JSON escape, a csv byte read with surrogateescape), not in UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def count_rows(spec: str | Path) -> int | None:
    """How many rows a source holds, cheaply (parquet and datasets from their metadata, jsonl by
    counting lines), for a progress bar's time left; None where it would cost a parse (csv)."""
    total = 0
    for path in expand(spec):
        kind = kind_of(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif kind == "hf":
            from datasets import DatasetDict, load_from_disk

            loaded = load_from_disk(str(path))
            total += sum(d.num_rows for d in loaded.values()) if isinstance(loaded, DatasetDict) else loaded.num_rows
        elif kind == "jsonl":
            with path.open("rb") as fh:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""))
        else:
            return None
    return total
