"""The attack matrix's report: which cells each attacker sees, heat maps and the HTML page."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training import report as rpt


def attacker_cells(organism: dict[str, Any], attacker: str) -> list[dict[str, Any]]:
    """The cells one attacker sees: the adaptive attacker's, and on rows it did not re-tune for
    (the base row, where it is the base-tuned attacker) the base-tuned cells; the budgeted
    attacker's own cells (it runs on every row)."""
    if attacker == "adaptive-budgeted":
        return [c for c in organism["cells"] if c.get("attacker") == attacker]
    static = [c for c in organism["cells"] if c.get("attacker", "base-tuned") == "base-tuned"]
    if attacker == "base-tuned":
        return static
    adaptive = {(c["row"], c["attack"]): c for c in organism["cells"] if c.get("attacker") == "adaptive"}
    attacks = {a for _, a in adaptive}
    return [adaptive.get((c["row"], c["attack"]), c) for c in static
            if c["attack"] in attacks and ((c["row"], c["attack"]) in adaptive or c["row"] == "base")]


def _heatmap(organism: dict[str, Any], rows: Sequence[str], attacker: str = "base-tuned") -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    cells = attacker_cells(organism, attacker)
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    grid = np.full((len(rows), len(attacks)), np.nan)
    notes = [["" for _ in attacks] for _ in rows]
    for c in cells:
        if c["row"] in rows:
            i, j = rows.index(c["row"]), attacks.index(c["attack"])
            grid[i, j] = c["asr"]
            kl = "—" if c["kl_harmless"] is None else f"{c['kl_harmless']:.2f}"
            notes[i][j] = f"{100 * c['asr']:.0f}%\nOR {100 * (c['over_refusal'] or 0):.0f}%\nKL {kl}"
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2, 0.9 * len(rows) + 1.6))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    for i in range(len(rows)):
        for j in range(len(attacks)):
            if notes[i][j]:
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=6.5,
                        color="white" if grid[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="ASR (held-out harmful)")
    ax.set_title(f"{organism['organism']} organism, {attacker} attacker: ASR (OR = over-refusal, KL = attack's harmless KL)",
                 fontsize=9)
    fig.tight_layout()
    return rpt.png_base64(fig)


def _alpha_curves(organism: dict[str, Any]) -> str | None:
    """Held-out ASR (coherent compliance) against α at the budgeted attacker's place, one line per
    row, the budget's own α marked."""
    import matplotlib.pyplot as plt

    curves = [c for c in organism["cells"] if c.get("alpha_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for c in curves:
        points = c["alpha_curve"]
        line, = ax.plot([p["alpha"] for p in points], [100 * (p["asr"] or 0) for p in points], marker=".", label=c["row"])
        chosen = [p for p in points if p["budget_choice"]]
        ax.scatter([p["alpha"] for p in chosen], [100 * (p["asr"] or 0) for p in chosen], s=70, color=line.get_color(),
                   edgecolor="black", zorder=3)
    ax.set_xlabel("α (multiples of the row's own difference in means)")
    ax.set_ylabel("held-out ASR, coherent (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{organism['organism']}: actadd at the budgeted attacker's place (ringed: the α within the budget)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return rpt.png_base64(fig)


def _budgeted_section(organism: dict[str, Any]) -> str:
    rows = []
    for c in attacker_cells(organism, "adaptive-budgeted"):
        curve = "; ".join(f"α {p['alpha']:g}: {100 * (p['asr'] or 0):.0f}% ({p['n_no_answer']} unfinished, KL "
                          f"{'—' if p['kl_harmless'] is None else format(p['kl_harmless'], '.2f')})" for p in c.get("alpha_curve", []))
        rows.append([c["row"], c["attack"], c["asr"], c.get("asr_judge"), c["over_refusal"], c["kl_budget"], c.get("kl_validation"),
                     c["kl_harmless"], c["n_no_answer"], json.dumps(c["params"]), c.get("note") or curve])
    return rpt.table(rows, ["model", "attack", "ASR (coherent)", "ASR (judged)", "over-refusal", "KL budget",
                            "KL reached (validation)", "KL held-out", "no answer", "setting", "α curve (held-out) / note"])


def write_attacks_html(path: Path, doc: dict[str, Any]) -> None:
    sections: list[tuple[str, str]] = []
    for org in doc["organisms"]:
        rows = [r for r in doc["rows"] if any(c["row"] == r for c in org["cells"])]
        sections.append((f"{org['organism']}: attack matrix, base-tuned attacker", rpt.img(_heatmap(org, rows), "ASR heat map")))
        if any(c.get("attacker") == "adaptive" for c in org["cells"]):
            sections.append((f"{org['organism']}: attack matrix, adaptive attacker",
                             rpt.img(_heatmap(org, rows, "adaptive"), "ASR heat map, adaptive attacker")))
        if any(c.get("attacker") == "adaptive-budgeted" for c in org["cells"]):
            sections.append((f"{org['organism']}: budgeted adaptive attacker", rpt.img(_heatmap(org, rows, "adaptive-budgeted"),
                                                                                      "ASR heat map, budgeted attacker")
                             + _budgeted_section(org)))
            curves = _alpha_curves(org)
            if curves:
                sections.append((f"{org['organism']}: ASR against α (actadd)", rpt.img(curves, "ASR against alpha")))
        table = [[c["row"], c["attack"], c.get("attacker", "base-tuned"), c["asr"], c["asr_suppressed"], c["asr_other"],
                  c["over_refusal"], c["kl_harmless"], c["n_no_answer"], json.dumps(c.get("direction_at")), json.dumps(c["params"])]
                 for c in org["cells"]]
        sections.append((f"{org['organism']}: cells", rpt.table(table, [
            "model", "attack", "attacker", "ASR", "ASR suppressed", "ASR other areas", "over-refusal", "KL harmless",
            "no answer", "direction (layer, position)", "strength"])))
        d = org["direction"]
        if d:
            sections.append((f"{org['organism']}: refusal direction", rpt.table(
                [[c["layer"], c["position"], c["refusal_ablated"], c["induce_refusal"], c["kl_harmless"], c["passed"]]
                 for c in d["candidates"]],
                ["layer", "position", "val refusal (ablated)", "val induced refusal", "val KL", "passed filters"])
                + f"<p class='note'>chosen: layer {d['layer']}, position {d['position']}; validation refusal without "
                  f"attack {d['baseline']}. {d['note']}</p>"))
        if "single-expert" in org["validation"]:
            sweep = sorted(org["validation"]["single-expert"], key=lambda r: -(r["asr"] or 0))
            sections.append((f"{org['organism']}: single-expert sweep (validation)", rpt.table(
                [[r["params"]["layer"], r["params"]["expert"], r["asr"], r["over_refusal"]] for r in sweep],
                ["layer", "expert", "val ASR", "val over-refusal"])))
    sections.append(("About", "<p class='note'>ASR: share of held-out harmful prompts whose final answer the judge "
                     "(the evaluation settings' one, context by default) calls compliance. Directions and vectors are re-extracted from each row's model; strengths "
                     "were tuned on the base model's validation split (train prompts, never the held-out ones) for the "
                     "base-tuned attacker, and on each row's own model and validation split for the adaptive one. KL is "
                     "per token on the base model's own harmless answers, steered model against the same model "
                     "unsteered (prompt templates are not part of it). The budgeted adaptive attacker searches the same "
                     "space as the adaptive one, held to a KL budget on the row's own harmless validation answers, and "
                     "counts only coherent compliance (the reasoning closed, the answer not degenerate).</p>"))
    rpt.write_html_report(path, "Steering attacks before and after fine-tuning", sections)
