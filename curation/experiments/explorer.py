"""The per-example explorer of ``report.html``: the scored pool as a table (sortable, filterable,
paginated) and, one click away, a row's prompt, its reasoning with every token coloured by the
probe's refusal score, the cliff marked, the answer and the judge's verdict.

One self-contained file: the data is embedded as JSON and the page's script (``explorer.js``,
plain JavaScript, no CDN) draws it. Every pool row is in the table; the per-token detail is
embedded for a sample only (every selected row, then the highest-MS rows, then a seeded random
draw, ``max_detailed`` in all), so the page stays light at 100,000 rows. All text reaches the page
through ``textContent``, never as markup: a candidate's prompt is untrusted input.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from curation.pipeline.store import Store
from probes.chat import ThinkingFormat, split_completion

MAX_DETAILED = 2000
# Columns of a table row, in the order the script reads them.
COLUMNS = ("id", "misalignment", "plateau", "final", "category", "selected", "closed", "detailed")


@dataclass(frozen=True)
class ExplorerData:
    rows: list[list[Any]]
    details: dict[str, dict[str, Any]]


def explorer_data(store: Store, model_fingerprint: str, probe_id: str, selected: set[str], tokenizer: Any,
                  fmt: ThinkingFormat, ends: Sequence[str] = (), *, settings_sha256: str | None = None,
                  max_detailed: int = MAX_DETAILED, seed: int = 0) -> ExplorerData:
    """The pool's rows (one per example, its highest-MS score) and the detail of a sample of them."""
    pool = store.con.execute(
        "SELECT s.example_id, s.misalignment, s.plateau, s.final, e.category, s.closed FROM scores s "
        "JOIN examples e ON e.id = s.example_id WHERE s.model_fingerprint = ? AND s.probe_id = ? "
        "AND (CAST(? AS VARCHAR) IS NULL OR s.settings_sha256 = ?) ORDER BY s.misalignment DESC, s.example_id",
        [model_fingerprint, probe_id, settings_sha256, settings_sha256]).fetchall()
    seen: set[str] = set()
    rows: list[list[Any]] = []
    for example_id, ms, plateau, final, category, closed in pool:
        if example_id in seen:
            continue
        seen.add(example_id)
        rows.append([example_id, _num(ms), _num(plateau), _num(final), category, int(example_id in selected), int(closed), 0])
    chosen = _sample([r[0] for r in rows], selected, max_detailed, seed)
    details = _details(store, model_fingerprint, probe_id, settings_sha256, chosen, tokenizer, fmt, ends)
    for r in rows:
        r[7] = int(r[0] in details)
    return ExplorerData(rows, details)


def _num(value: float) -> float | None:
    return round(float(value), 4) if value == value and abs(value) != float("inf") else None


def _sample(ids_by_ms: list[str], selected: set[str], limit: int, seed: int) -> list[str]:
    picked = [i for i in ids_by_ms if i in selected][:limit]
    top = [i for i in ids_by_ms if i not in selected][: max(0, (limit - len(picked)) // 2)]
    picked += top
    rest = [i for i in ids_by_ms if i not in set(picked)]
    random.Random(seed).shuffle(rest)
    return picked + rest[: max(0, limit - len(picked))]


def _details(store: Store, model_fingerprint: str, probe_id: str, settings_sha256: str | None, ids: list[str],
             tokenizer: Any, fmt: ThinkingFormat, ends: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not ids:
        return {}
    found = store.con.execute(
        "SELECT s.example_id, e.prompt, s.trace, s.cliff_position, s.generation_id, s.answer_verdict, s.reasoning, s.closed "
        "FROM scores s JOIN examples e ON e.id = s.example_id WHERE s.model_fingerprint = ? AND s.probe_id = ? "
        "AND (CAST(? AS VARCHAR) IS NULL OR s.settings_sha256 = ?) AND s.example_id IN (SELECT unnest(?)) "
        "ORDER BY s.misalignment DESC", [model_fingerprint, probe_id, settings_sha256, settings_sha256, ids]).fetchall()
    generations = store.stored_generations([r[4] for r in found if r[4]])
    close_ids = tokenizer.encode(fmt.close_marker, add_special_tokens=False)
    out: dict[str, dict[str, Any]] = {}
    for example_id, prompt, trace, cliff, generation_id, verdict, reasoning, closed in found:
        if example_id in out:
            continue
        trace = [round(float(v), 3) for v in trace]
        generation = generations.get(generation_id) if generation_id else None
        token_ids = _trace_tokens(generation.generated_ids if generation else None, len(trace), closed, close_ids)
        if token_ids is None:  # no stored generation (imported rows): re-tokenise the reasoning as stored
            token_ids = tokenizer.encode(reasoning, add_special_tokens=False) + close_ids
        pieces = tokenizer.batch_decode([[i] for i in token_ids], skip_special_tokens=False)
        aligned = len(pieces) == len(trace)
        out[example_id] = {
            "prompt": prompt,
            "tokens": pieces if aligned else [reasoning],
            "trace": trace if aligned else [],
            "cliff": int(cliff),
            "answer": split_completion(generation.text, fmt, ends).answer if generation else None,
            "verdict": verdict,
        }
    return out


def _trace_tokens(generated: list[int] | None, n: int, closed: bool, close_ids: list[int]) -> list[int] | None:
    """The token ids the trace was read over: the reasoning through its close marker, or, for a trace
    cut by the length cap, its first tokens with the close marker appended (as it was scored)."""
    if generated is None:
        return None
    return generated[:n] if closed else generated[: n - len(close_ids)] + close_ids


def explorer_section(data: ExplorerData, page_size: int = 50) -> str:
    """The explorer's HTML: controls, table, pager, detail panel, the embedded data and the script."""
    payload = {"columns": COLUMNS, "rows": data.rows, "details": data.details, "pageSize": page_size}
    # "</" would end the script element early; JSON allows the escaped form.
    embedded = json.dumps(payload, ensure_ascii=False).replace("</", "<\\/")
    script = resources.files("curation.experiments").joinpath("explorer.js").read_text(encoding="utf-8")
    n_detailed = len(data.details)
    return (
        "<style>#ex-table td,#ex-table th{font-size:.85rem}#ex-table th{cursor:pointer}#ex-table tr.sel td{background:#fff6d5}"
        "#ex-table tbody tr{cursor:pointer}#ex-table tbody tr:hover td{background:#eef}"
        ".ex-controls{display:flex;gap:.8rem;flex-wrap:wrap;align-items:center;margin:.4rem 0}"
        "#ex-detail{border:1px solid #ccc;padding:.6rem;margin-top:.6rem}"
        "#ex-reasoning{line-height:1.9;white-space:pre-wrap}#ex-reasoning span{border-radius:2px}"
        "#ex-reasoning span.cliff{outline:2px solid #000;position:relative}"
        ".ex-legend span{display:inline-block;width:1.2rem;height:.8rem;vertical-align:middle}</style>"
        f"<p>All {len(data.rows):,} scored rows; the per-token detail is embedded for {n_detailed:,} of them (every "
        "selected row, the highest misalignment scores, and a random draw). Click a column to sort, a row to open it.</p>"
        "<div class='ex-controls'><label>search <input id='ex-search' placeholder='id or category'></label>"
        "<label>category <select id='ex-category'><option value=''>all</option></select></label>"
        "<label>selected <select id='ex-selected'><option value=''>all</option><option value='1'>selected</option>"
        "<option value='0'>not selected</option></select></label>"
        "<label>MS from <input id='ex-min' type='number' step='0.05' style='width:5rem'></label>"
        "<label>to <input id='ex-max' type='number' step='0.05' style='width:5rem'></label>"
        "<span id='ex-count'></span></div>"
        "<table id='ex-table'><thead><tr><th data-col='0'>id</th><th data-col='1'>MS = I − I′</th><th data-col='2'>plateau I</th>"
        "<th data-col='3'>final I′</th><th data-col='4'>category</th><th data-col='5'>selected</th><th data-col='6'>closed</th>"
        "</tr></thead><tbody></tbody></table>"
        "<div class='ex-controls'><button id='ex-prev'>previous</button><span id='ex-page'></span>"
        "<button id='ex-next'>next</button></div>"
        "<div id='ex-detail' hidden><h3 id='ex-title'></h3><p><b>prompt</b></p><p id='ex-prompt'></p>"
        "<p><b>reasoning</b>, each token coloured by its refusal score "
        "<span class='ex-legend'>0 <span style='background:rgba(40,90,200,.85)'></span> … "
        "<span style='background:rgba(210,40,40,.85)'></span> 1</span>; the outlined token is the cliff</p>"
        "<div id='ex-reasoning'></div><p><b>answer</b></p><p id='ex-answer'></p>"
        "<p><b>verdict</b> <span id='ex-verdict'></span></p></div>"
        f"<script type='application/json' id='ex-data'>{embedded}</script><script>{script}</script>"
    )
