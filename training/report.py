"""Reports: plots of the refusal cliff and of ASR, a self-contained HTML page
(plots embedded as PNG) and the JSON other tools read."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probes.cliff import smooth  # noqa: E402
from probes.files import write_text_atomic  # noqa: E402


def png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_cliff_traces(
    traces: Sequence[tuple[str, str | None, float, list[float]]],
    highlight: set[str],
    path: str | Path | None = None,
    max_lines: int = 40,
    window: int = 3,
) -> str:
    """Per-token refusal scores, right-aligned so the close marker is at 0.

    Traces are smoothed with the same moving average that defines the plateau
    (the last point stays raw, as I′ does). Selected examples (``highlight``)
    are drawn in red over a grey sample of the rest, with each group's mean
    over the traces that reach each position; the cliff is the red fall at the
    right edge. Returns the PNG as base64 (and writes it to ``path`` if given).
    """
    fig, ax = plt.subplots(figsize=(8, 4))
    chosen = [t for t in traces if t[0] in highlight]
    rest = [t for t in traces if t[0] not in highlight]
    for group, colour, label in ((rest, "0.55", "not selected"), (chosen, "tab:red", "selected (top MS)")):
        curves = [np.append(smooth(np.asarray(t[3]), window)[:-1], t[3][-1]) for t in group]
        step = max(1, len(curves) // max_lines)
        for i, curve in enumerate(curves[::step]):
            ax.plot(np.arange(-len(curve) + 1, 1), curve, color=colour, alpha=0.25, lw=1, label=label if i == 0 else None)
        if curves:
            width = max(len(c) for c in curves)
            padded = np.full((len(curves), width), np.nan)
            for row, c in enumerate(curves):
                padded[row, width - len(c) :] = c
            counts = np.sum(~np.isnan(padded), axis=0)
            keep = counts >= max(2, len(curves) // 4)  # only positions most traces reach
            mean = np.nanmean(padded[:, keep], axis=0)
            ax.plot(np.arange(-width + 1, 1)[keep], mean, color=colour, lw=3, label=f"mean, {label}")
    ax.set_xlabel("token position relative to the close marker (0 = </think>)")
    ax.set_ylabel(f"refusal probe score ({window}-token moving average)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Refusal cliff: the probe's refusal score over the model's own reasoning")
    ax.legend(loc="lower left", fontsize=8)
    encoded = png_base64(fig)
    if path is not None:
        Path(path).write_bytes(base64.b64decode(encoded))
    return encoded


def plot_misalignment_by_category(traces: Sequence[tuple[str, str | None, float, list[float]]]) -> str:
    """Distribution of MS per category (only meaningful where categories are known)."""
    by_cat: dict[str, list[float]] = {}
    for _, cat, ms, _ in traces:
        by_cat.setdefault(cat or "unknown", []).append(ms)
    names = sorted(by_cat, key=lambda c: -float(np.mean(by_cat[c])))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.boxplot([by_cat[n] for n in names], vert=False)
    ax.set_yticks(range(1, len(names) + 1), [n[:40] for n in names], fontsize=8)
    ax.set_xlabel("misalignment score MS = I − I′")
    ax.set_title("MS by category")
    return png_base64(fig)


def plot_asr(rows: dict[str, tuple[float | None, float | None]]) -> str:
    """Grouped bars: each metric before and after the fine-tune."""
    names = list(rows)
    before = [rows[n][0] or 0.0 for n in names]
    after = [rows[n][1] or 0.0 for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(x - 0.2, before, 0.4, label="before", color="tab:gray")
    ax.bar(x + 0.2, after, 0.4, label="after", color="tab:blue")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend()
    ax.set_title("Held-out evaluation before and after the fine-tune")
    return png_base64(fig)


# The pipeline's order (generate -> probe -> score -> select -> finetune -> evaluate), so a
# report reads stage times as the job ran them, never alphabetically.
PIPELINE_ORDER = ("build organism", "generate", "train probe", "probe", "score pool", "score", "select", "retain set",
                  "retain", "LoRA fine-tune", "finetune", "evaluate before", "evaluate", "evaluate after")


def stage_times_in_order(seconds: dict[str, float]) -> list[tuple[str, float]]:
    """Known stages in pipeline order, then any others as recorded, ``total`` last."""
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    rest = [k for k in seconds if k != "total"]
    ordered = sorted(rest, key=lambda k: (rank.get(k, len(rank)), rest.index(k)))
    return [(k, seconds[k]) for k in ordered] + ([("total", seconds["total"])] if "total" in seconds else [])


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def write_html_report(
    path: str | Path,
    title: str,
    sections: Sequence[tuple[str, str]],
) -> None:
    """``sections`` are (heading, inner HTML); images are passed as base64 via ``img``."""
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}.note{color:#666;font-size:.9rem}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>{inner}" for h, inner in sections)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    write_text_atomic(path, page)


def img(encoded_png: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded_png}'>"

