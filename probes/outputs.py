"""One rule for every output: curate never writes over a file or folder it did
not write itself, unless the user says ``--force``, and never over one of the
command's own inputs, even then.

How "written by curate" is known: every output gets a small ownership mark
when it is written, ``.NAME.curate.json`` beside a file or ``.curate.json``
inside a folder, naming the verb and the time. A path with no mark is
someone else's. A rerun of the same command finds its own mark and goes on.

Lives in ``probes`` because every package writes outputs and may import
``probes``; nothing here is about models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

FOLDER_MARK = ".curate.json"


class OutputError(ValueError):
    """An output path that curate refuses to write."""


def mark_path(path: str | Path) -> Path:
    path = Path(path)
    return path / FOLDER_MARK if path.is_dir() else path.with_name(f".{path.name}.curate.json")


def is_ours(path: str | Path) -> bool:
    path = Path(path)
    return mark_path(path).is_file()


def mark_output(path: str | Path, verb: str) -> None:
    """Record that ``verb`` wrote ``path`` (call after the output is in place)."""
    path = Path(path)
    mark = mark_path(path)
    tmp = mark.with_name(mark.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"written_by": f"curate {verb}", "at": datetime.now(UTC).isoformat(timespec="seconds")}))
    os.replace(tmp, mark)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class OutputSpec:
    flag: str  # "--out"
    path: str | None
    folder: bool = False  # the output is a folder (a probe, an adapter, a model)


def check_outputs(verb: str, outputs: list[OutputSpec], inputs: Mapping[str, str | None], force: bool) -> None:
    """Refuse, before any work starts, an output that is an input, the wrong kind of
    path, or someone else's file (without ``--force``)."""
    for out in outputs:
        if out.path is None:
            continue
        if not str(out.path).strip():
            raise OutputError(f"{out.flag} is empty")
        path = Path(out.path)
        for in_flag, in_path in inputs.items():
            if not in_path:
                continue
            src = Path(in_path)
            # A folder output may not be an input nor hold one (writing it replaces the whole folder);
            # a file output may not be an input nor sit inside an input folder such as the model.
            if _same(path, src) or _inside(src, path) or (src.is_dir() and _inside(path, src)):
                raise OutputError(f"{out.flag} {path} is also an input ({in_flag} {src}); "
                                  "curate never writes over its inputs, with or without --force")
        if not path.exists():
            continue
        if not out.folder and path.is_dir():
            raise OutputError(f"{out.flag} {path} is a directory; give a file path")
        if out.folder and not path.is_dir():
            raise OutputError(f"{out.flag} {path} is a file; give a folder path")
        if out.folder and not any(path.iterdir()):
            continue  # an empty folder holds nothing to lose
        if not force and not is_ours(path):
            raise OutputError(f"{out.flag} {path} already exists and was not written by curate {verb}; "
                              "pass --force to overwrite it")
