"""``curate doctor``: load a model directory and run the conformance checks of
``probes.doctor`` on it, before a long GPU job rather than after."""

from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table

from curation.cli.options import Option
from curation.cli.progress import stages
from curation.cli.verb import MODEL_OPTIONS, Settings, Verb, json_object, load_model_from, out_console, thinking_format


def run_doctor_verb(s: Settings) -> int:
    from probes.doctor import results_json, run_doctor
    from probes.families import family_of, override_family, use_family

    with stages("doctor") as say:
        say(f"loading {s['model']}")
        lm = load_model_from(s)
        family = family_of(lm.model)
        if s.get("adapter"):
            family = override_family(family, s["adapter"])
            use_family(lm.model, family)
        say(f"{family.name} adapter: running the checks")
        fmt = thinking_format(s)
        results = run_doctor(lm, fmt, seed=s["seed"])
    doc = results_json(lm, results)
    if s["json"]:
        print(json.dumps(doc, indent=2))
    else:
        table = Table(title=escape(f"curate doctor: {lm.path} ({family.name}, {lm.model.dtype})"))
        for column in ("check", "result", "measured", "limit", "detail"):
            table.add_column(column)
        for r in results:
            figure = "-" if r.figure is None else f"{r.figure:.3g}"
            table.add_row(escape(r.name), "[green]pass[/]" if r.passed else "[red]FAIL[/]", figure, escape(r.limit), escape(r.detail))
        out_console.print(table)
        failed = [r.name for r in results if not r.passed]
        out_console.print("all checks pass" if not failed else escape(f"failed: {'; '.join(failed)}"), highlight=False)
    return 0 if doc["passed"] else 1


DOCTOR_VERB = Verb("doctor", "check that every model-internal operation is exact on this model (run before a long GPU job)", [
    Option("--model", str, None, "model directory (Hugging Face layout, safetensors)", required=True),
    *[o for o in MODEL_OPTIONS if o.dest != "dtype"],
    Option("--dtype", str, "float32", "float32 (the limits are for fp32), bfloat16 or float16 (limits loosened 64x)"),
    Option("--adapter", json_object, None, 'JSON object replacing adapter declarations, to try an adapter on a new '
           'checkpoint: \'{"experts": {"down_layout": "in_hidden"}}\''),
    Option("--seed", int, 0, "seed of the random directions"),
    Option("--json", None, False, "print one JSON document with every check and its figure on stdout"),
], run_doctor_verb, inputs=("model",))
