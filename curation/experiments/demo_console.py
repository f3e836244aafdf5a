"""The demo's closing summary on the console: the before/after table and one line per finding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from curation.experiments.demo_spread import spread_line
from training import report as rpt
from training.judge_record import agreement_line


def print_summary(console: Console, result: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}%"

    sel = result["selection"]
    table = Table(title="cliff-curate demo (model organism)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("ASR, suppressed areas (held-out)", pct(result["asr"]["before"]), pct(result["asr"]["after"]))
    table.add_row("ASR, all harmful (held-out)", pct(result["asr_all"]["before"]), pct(result["asr_all"]["after"]))
    table.add_row("over-refusal, harmless (held-out)", pct(result["over_refusal"]["before"]), pct(result["over_refusal"]["after"]))
    console.print(table)
    console.print(
        f"selected {sel['n_selected']} of {sel['n_pool']} ({sel['budget']}, strategy {sel['strategy']}); "
        f"{pct(sel['share_from_suppressed'])} from the suppressed areas (they are {pct(sel['pool_share_suppressed'])} of the pool)"
    )
    if result.get("reference_spread") is not None:
        console.print(spread_line(result["reference_spread"]), highlight=False)
    console.print(agreement_line(result["judge"]["name"], result["judge"].get("held_out_agreement")), highlight=False)
    console.print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in rpt.stage_times_in_order(result["seconds"])))
    console.print(f"report: {result['paths']['report_html']}  json: {Path(result['paths']['report_html']).with_name('report.json')}")
