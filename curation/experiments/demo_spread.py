"""The demo's figures over several organism seeds: the range a correct install lands in.

One demo run is one organism (one seed): its figures move by several points from seed to seed,
and across machines whose CPUs round differently (the same machine gives the same figures
whatever the thread count). So the README gives the spread over seeds in place of one figure,
and every demo prints where its own run falls in it, to tell a broken install from noise.

``python -m curation.experiments.demo_spread runs/demo-s0 runs/demo-s1 …`` (each a finished
demo's work directory) writes the reference, ``curation/experiments/demo_spread.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).with_name("demo_spread.json")
# (label, where in report.json)
METRICS = (
    ("ASR, suppressed areas, before", ("asr", "before")),
    ("ASR, suppressed areas, after", ("asr", "after")),
    ("ASR, all harmful, before", ("asr_all", "before")),
    ("ASR, all harmful, after", ("asr_all", "after")),
    ("over-refusal, before", ("over_refusal", "before")),
    ("over-refusal, after", ("over_refusal", "after")),
    ("selected from the suppressed areas", ("selection", "share_from_suppressed")),
)
MARGIN = 0.05  # five points either side of the seeds' range before a run counts as outside it


def _value(report: dict[str, Any], path: tuple[str, str]) -> float:
    return float(report[path[0]][path[1]])


def spread(reports: list[dict[str, Any]]) -> dict[str, Any]:
    if len(reports) < 2:
        raise ValueError("a spread needs at least two demo runs")
    out: dict[str, Any] = {"n_runs": len(reports), "seeds": [r["organism"]["config"]["seed"] for r in reports], "metrics": {}}
    for label, path in METRICS:
        values = [_value(r, path) for r in reports]
        out["metrics"][label] = {"min": min(values), "max": max(values), "mean": statistics.mean(values),
                                 "sd": statistics.stdev(values), "values": values}
    return out


def load_reference() -> dict[str, Any] | None:
    return json.loads(REFERENCE.read_text()) if REFERENCE.exists() else None


def outside(report: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The metrics of this run outside the reference range (widened by MARGIN)."""
    far = []
    for label, path in METRICS:
        ref = reference["metrics"].get(label)
        value = _value(report, path)
        if ref is not None and not ref["min"] - MARGIN <= value <= ref["max"] + MARGIN:
            far.append(f"{label} {100 * value:.1f}% (seeds: {100 * ref['min']:.1f}–{100 * ref['max']:.1f}%)")
    return far


def compare_with_reference(result: dict[str, Any]) -> dict[str, Any] | None:
    """Where a default demo's run falls in the reference spread (None: no reference packaged)."""
    reference = load_reference()
    if reference is None:
        return None
    far = outside(result, reference)
    return {"n_runs": reference["n_runs"], "seeds": reference["seeds"], "inside": not far, "outside": far,
            "ranges": {k: [m["min"], m["max"]] for k, m in reference["metrics"].items()}}


def spread_line(spread: dict[str, Any]) -> str:
    def rng(label: str) -> str:
        lo, hi = spread["ranges"][label]
        return f"{100 * lo:.0f}–{100 * hi:.0f}%"

    verdict = ("this run is inside that spread" if spread["inside"] else
               "[bold red]this run is outside it[/bold red] (" + "; ".join(spread["outside"]) + "): check the install")
    return (f"over {spread['n_runs']} organism seeds on the development machine: suppressed-area ASR "
            f"{rng('ASR, suppressed areas, before')} → {rng('ASR, suppressed areas, after')}, over-refusal "
            f"{rng('over-refusal, before')} → {rng('over-refusal, after')}; {verdict}")


def main(argv: list[str]) -> None:
    reports = [json.loads((Path(d) / "report.json").read_text()) for d in argv]
    doc = {**spread(reports), "about": "curate demo on the development machine (2 CPU cores), one run per seed; "
           "written by python -m curation.experiments.demo_spread"}
    REFERENCE.write_text(json.dumps(doc, indent=2) + "\n")
    for label, m in doc["metrics"].items():
        print(f"{label}: {100 * m['min']:.1f}–{100 * m['max']:.1f}% (mean {100 * m['mean']:.1f}, sd {100 * m['sd']:.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])
