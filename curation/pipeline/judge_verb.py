"""``curate judge``: judge existing (request, answer) pairs, and with ``--labels``
measure the judge against a team's own labels before trusting it.

Rows come from the one reader (jsonl, csv, parquet, saved datasets) through the
usual layout flags (``--format``, ``--map``, ``--where``). The answer is the
row's ``answer``, or else the text of its ``response`` after the close marker
(the judge reads the final answer, never the reasoning). A row that cannot be
judged (no request, no answer text, a label that is neither class) is counted,
listed on stderr and written nowhere: the figures are over the judged rows only.

Every judge answers in the four outcomes (``training.judge_outcomes``): the
relevance judge gives them itself, a two-way judge's verdicts are mapped onto
them. With ``--labels`` the figures come overall, per outcome (the four-outcome
confusion) and per source (``--by``, a column such as the label set's name).
``--calibrate FILE`` fits the relevance judge's thresholds on the dev half of
the labels (``training.judge_calibration``) and writes them with the dev and
held-out test figures; ``--thresholds FILE`` judges with such a file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from curation.cli.options import Option
from curation.cli.verb import (
    DATA_OPTIONS,
    JUDGE_OPTION,
    MARKER_OPTIONS,
    Output,
    Settings,
    Verb,
    check_input_file,
    console,
    layout_from,
    out_console,
    single_judge,
    thinking_format,
)

if TYPE_CHECKING:
    from probes.chat import ThinkingFormat
    from probes.rows import Row


def _answer(row: dict[str, Any], fmt: ThinkingFormat) -> str | None:
    from curation.pipeline.sources import split_response  # imports the tokenizer stack: not at registry load

    if isinstance(row.get("answer"), str):
        return row["answer"]
    response = row.get("response")
    # The candidates' own rule: the text after the close marker (and after a format's answer header,
    # harmony's final channel), or the whole response when it has no close marker.
    return split_response(response, fmt)[1] if isinstance(response, str) else None


def run_judge(s: Settings) -> int:
    from probes.files import write_text_atomic
    from training.judge_agreement import agreement, outcome_confusion, read_label
    from training.judge_calibration import split_of
    from training.judge_outcomes import outcome_verdict, verdict_outcome
    from training.judges import make_judge

    judge = make_judge(single_judge(s, "judge"))
    if (s["calibrate"] or s["thresholds"]) and not hasattr(judge, "with_thresholds"):
        raise ValueError(f"--calibrate and --thresholds set the relevance judge's cosines; --judge {judge.name} has none")
    if s["split"] not in ("all", "dev", "test"):
        raise ValueError(f"--split {s['split']!r}: use all, dev or test")
    if s["calibrate"] and s["split"] != "all":
        raise ValueError("--calibrate splits the pairs itself: leave --split at all")
    if s["calibrate"] and not s["labels"]:
        raise ValueError("--calibrate fits on people's labels: give the label column with --labels")
    if s["thresholds"]:
        judge = _with_threshold_file(judge, s["thresholds"])
    layout, fmt = layout_from(s), thinking_format(s)
    kept: list[tuple[dict[str, Any], str, str, str | None]] = []  # (row, prompt, answer, label)
    skipped: list[str] = []
    for row in _rows(s):
        where = f"{row.file}:{row.locator}"
        if row.error is not None:
            skipped.append(f"{where}: {row.error}")
            continue
        if not isinstance(row.value, dict) or not layout.keeps(row.value):
            if not isinstance(row.value, dict):
                skipped.append(f"{where}: not an object")
            continue
        mapped = layout.apply(row.value)
        prompt, answer = mapped.get("prompt"), _answer(mapped, fmt)
        if not isinstance(prompt, str) or not prompt.strip() or answer is None:
            skipped.append(f"{where}: needs a non-empty 'prompt' and an 'answer' (or a 'response')")
            continue
        label = None
        if s["labels"]:
            label = read_label(row.value.get(s["labels"]))
            if label is None:
                skipped.append(f"{where}: label column '{s['labels']}' holds {row.value.get(s['labels'])!r}, "
                               "not refusal/compliance or 1/0")
                continue
        if s["split"] != "all" and split_of(prompt, answer) != s["split"]:
            continue
        kept.append((row.value, prompt, answer, label))
    if not kept:
        raise ValueError(f"--in {s['in']}: no row could be judged ({len(skipped)} skipped)")
    if s["calibrate"]:
        return _calibrate(s, judge, kept)
    # A classifier model's own words go with each verdict, so an unparsed one can be read.
    started = time.perf_counter()
    classify = getattr(judge, "classify", None)
    prompts, answers = [k[1] for k in kept], [k[2] for k in kept]
    outputs: list[str | None] = [None] * len(kept)
    if hasattr(judge, "outcomes"):  # a four-outcome judge: the verdicts follow from its outcomes
        outcomes = judge.outcomes(prompts, answers)
        verdicts = [outcome_verdict(o) for o in outcomes]
    else:
        if classify is not None:
            classified = classify(prompts, answers)
            verdicts, outputs = [c.verdict for c in classified], [c.output for c in classified]
        else:
            verdicts = judge.judge_pairs(prompts, answers)
        outcomes = [verdict_outcome(v) for v in verdicts]
    seconds = time.perf_counter() - started
    if s["out"]:
        write_text_atomic(s["out"], "".join(
            json.dumps({**row, "verdict": v, "outcome": oc, "judge": judge.name,
                        **({"judge_output": o} if o is not None else {})}, default=str)
            + "\n" for (row, *_), v, oc, o in zip(kept, verdicts, outcomes, outputs, strict=True)))
    doc: dict[str, Any] = {"judge": judge.name, "judge_settings": judge.settings(), "n": len(kept), "n_skipped": len(skipped),
                           "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
                           "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
                           # Loading included (the encoder loads once per process): what a job pays to judge.
                           "seconds": round(seconds, 3), "pairs_per_second": round(len(kept) / seconds, 1) if seconds else None}
    if s["labels"]:
        labels = [str(k[3]) for k in kept]
        doc.update(agreement(labels, verdicts).as_json())
        doc["outcome_confusion"] = outcome_confusion(labels, outcomes)
        sources = [str(k[0].get(s["by"], "(none)")) if isinstance(k[0], dict) else "(none)" for k in kept]
        if len(set(sources)) > 1:
            doc["by_source"] = {
                src: {**agreement([labels[i] for i in idx], [verdicts[i] for i in idx]).as_json(),
                      "outcome_confusion": outcome_confusion([labels[i] for i in idx], [outcomes[i] for i in idx])}
                for src in sorted(set(sources)) for idx in [[i for i, x in enumerate(sources) if x == src]]}
    for line in skipped[:10]:
        console.print(f"  skipped {line}", soft_wrap=True, markup=False, highlight=False)
    if len(skipped) > 10:
        console.print(f"  … and {len(skipped) - 10} more rows skipped", highlight=False)
    _print_table(doc, console if s["json"] else out_console)
    if s["json"]:
        print(json.dumps(doc))
    return 0


def _rows(s: Settings) -> Iterator[Row]:
    """The pairs: a file (``--in``), a labelled set another project ships (``--label-set``), or both
    (one calibration over both sets' dev halves)."""
    from probes.rows import Row, iter_rows

    if not s["in"] and not s["label_set"]:
        raise ValueError("give the pairs with --in FILE, --label-set NAME, or both")
    if s["in"]:
        check_input_file(s["in"], "--in")
        yield from iter_rows(s["in"], "--in")
    if not s["label_set"]:
        return
    from training.label_sets import load_label_set

    for i, value in enumerate(load_label_set(s["label_set"]), start=1):
        yield Row(file=s["label_set"], locator=i, value=value, error=None, raw="")


def _with_threshold_file(judge: Any, path: str) -> Any:
    from training.judge_relevance import RelevanceThresholds

    check_input_file(path, "--thresholds")
    try:
        doc = json.loads(open(path, encoding="utf-8").read())
        return judge.with_thresholds(**{k: float(v) for k, v in doc["thresholds"].items()
                                        if k in RelevanceThresholds.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--thresholds {path}: not a calibration file (needs a 'thresholds' object of cosines): {err}") from err


def _calibrate(s: Settings, judge: Any, kept: list[tuple[dict[str, Any], str, str, str | None]]) -> int:
    from probes.files import write_json_atomic
    from training.judge_calibration import TEST_SHARE_BYTE, calibrate

    result = calibrate(judge, [k[1] for k in kept], [k[2] for k in kept], [str(k[3]) for k in kept])
    sources = sorted({str(k[0].get(s["by"], "(none)")) for k in kept})
    doc = {**result.as_json(), "calibrated_on": {"in": s["in"], "label_set": s["label_set"], "labels": s["labels"], "sources": sources,
                                                 "split": f"sha256(request NUL answer)[0] < {TEST_SHARE_BYTE} is test"}}
    write_json_atomic(s["calibrate"], doc)

    def pct(fig: dict[str, Any] | None, key: str) -> str:
        value = None if fig is None else fig.get(key)
        return "—" if value is None else f"{100 * value:.1f}%"

    table = Table(title=f"{judge.name} calibrated on {result.n_dev} dev pairs; {result.n_test} held out")
    for col in ("half", "n", "agreement", "refusal precision", "refusal recall"):
        table.add_column(col, justify="right")
    for half, fig, n in (("dev", result.dev, result.n_dev), ("test", result.test, result.n_test)):
        table.add_row(half, str(n), pct(fig, "agreement"), pct(fig, "precision_refusal"), pct(fig, "recall_refusal"))
    (console if s["json"] else out_console).print(table)
    (console if s["json"] else out_console).print(escape(f"thresholds {result.thresholds} written to {s['calibrate']}"))
    if s["json"]:
        print(json.dumps(doc))
    return 0


def _print_table(doc: dict[str, Any], where) -> None:
    if "confusion" not in doc:
        where.print(escape(f"{doc['judge']}: {doc['n']} pairs judged, {doc['verdicts']}"), highlight=False)
        return
    table = Table(title=f"{doc['judge']} against the labels: {doc['n']} pairs, agreement {100 * doc['agreement']:.1f}%")
    for col in ("label \\ verdict", "refusal", "compliance", "no answer", "unparsed"):
        table.add_column(col, justify="right")
    for label, row in doc["confusion"].items():
        table.add_row(label, *(str(row[v]) for v in ("refusal", "compliance", "no_answer", "unparsed")))
    where.print(table)

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    where.print(f"refusal precision {pct(doc['precision_refusal'])}, recall {pct(doc['recall_refusal'])}", highlight=False)
    outcomes = Table(title="by outcome (refused, off_topic and degenerate all deliver nothing)")
    for col in ("label \\ outcome", "refused", "off_topic", "degenerate", "complied", "unparsed"):
        outcomes.add_column(col, justify="right")
    for label, row in doc["outcome_confusion"].items():
        outcomes.add_row(label, *(str(row[o]) for o in ("refused", "off_topic", "degenerate", "complied", "unparsed")))
    where.print(outcomes)
    for src, fig in doc.get("by_source", {}).items():
        where.print(escape(f"  {src}: {fig['n']} pairs, agreement {pct(fig['agreement'])}, refusal precision "
                           f"{pct(fig['precision_refusal'])}, recall {pct(fig['recall_refusal'])}"), highlight=False)


JUDGE_VERB = Verb("judge", "judge (request, answer) pairs; with --labels, agreement with people's labels", [
    JUDGE_OPTION,
    Option("--in", str, None, "pairs: jsonl, csv, parquet or a saved dataset with prompt and answer (or response)"),
    Option("--label-set", str, None, "(with or in place of --in) a human-labelled set another project ships, read from its wheel "
           "(pyrit-refusal: PyRIT's 169 refusal-scorer pairs); label column 'label', source column 'source'"),
    Option("--out", str, None, "write the pairs with each verdict as jsonl"),
    Option("--labels", str, None, "column of people's labels (refusal/compliance or 1/0): report agreement, precision, recall"),
    Option("--json", None, False, "print one JSON document as the last line of stdout"),
    Option("--by", str, "source", "with --labels, also give the figures per value of this column (e.g. the label set)"),
    Option("--calibrate", str, None, "with --labels and the relevance judge: fit its cosines on the dev half (fixed hash "
           "split), write them and the held-out test figures to this JSON file"),
    Option("--split", str, "all", "judge only the dev or the test half of the fixed hash split --calibrate uses "
           "(all, dev, test): the held-out figures without refitting"),
    Option("--thresholds", str, None, "the relevance judge's cosines from a --calibrate file (default: the packaged ones)"),
    *DATA_OPTIONS,
    *MARKER_OPTIONS,
], run_judge, outputs=(Output("--out"), Output("--calibrate")), inputs=("--in", "--thresholds"))
