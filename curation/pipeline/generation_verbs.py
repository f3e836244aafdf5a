"""The ``generations`` verbs: bring in reasoning generated elsewhere."""

from __future__ import annotations

import json

from rich.table import Table

from curation.cli.options import Option
from curation.cli.verb import (
    GENERATION_OPTIONS,
    MODEL_OPTIONS,
    Output,
    Settings,
    Verb,
    check_input_file,
    console,
    out_console,
    sampling_from,
    thinking_format,
)


def run_generations_import(s: Settings) -> int:
    from curation.pipeline.generation_import import import_generations
    from curation.pipeline.score import ScoreSettings
    from curation.pipeline.store import Store
    from probes.models import load_model_shell, resolve_device, resolve_dtype
    from probes.rows import iter_rows

    check_input_file(s["data"], "--data")
    with Store(s["db"]) as store:
        # The tokenizer, the template and the config are all an import needs: the weights stay on disk.
        # The dtype is part of the generations' key: "auto" resolves as it would for scoring on this machine,
        # so score with the same --dtype (and budgets, sampling, format) to read what was imported.
        dtype = str(resolve_dtype(s["dtype"], resolve_device(s["device"]))).removeprefix("torch.")
        lm = load_model_shell(s["model"], trust_remote_code=s["trust_remote_code"], dtype=dtype)
        lm.sampling = sampling_from(s)
        settings = ScoreSettings(max_new_tokens=s["max_new_tokens"], answer_tokens=s["answer_tokens"],
                                 judge_answers=s["judge_answers"])
        summary = import_generations(lm, store, iter_rows(s["data"], "--data"), thinking_format(s), settings,
                                     replace=bool(s["replace"]))
    table = Table(title=f"generations import {summary.run_id} (settings {summary.settings_sha256[:12]})")
    table.add_column("")
    table.add_column("rows", justify="right")
    for label, value in (("rows read", summary.n_rows), ("imported", summary.n_imported),
                         ("already stored", summary.n_already_stored), ("quarantined", summary.n_quarantined),
                         ("stored with other reasoning", summary.n_conflicting), ("replaced (--replace)", summary.n_replaced)):
        table.add_row(label, str(value))
    (console if s["json"] else out_console).print(table)
    if summary.n_quarantined:
        console.print(f"  see the quarantined rows with: curate status --db {s['db']} (table quarantine)", soft_wrap=True,
                      markup=False)
    if summary.n_conflicting and not summary.n_replaced:
        console.print(f"  warning: {summary.n_conflicting} prompts are already stored with other reasoning for these settings; "
                      "the stored reasoning was kept (pass --replace to store the imported one instead)", soft_wrap=True,
                      markup=False)
    if s["json"]:
        print(json.dumps(summary.as_json()))
    return 0


GENERATIONS_IMPORT_VERB = Verb(
    "generations import",
    "store reasoning generated elsewhere (vLLM, SGLang) for a model, checked against its template and markers",
    [
        Option("--data", str, None, "jsonl, csv, parquet or saved dataset with prompt, reasoning, optional answer and "
               "optional settings (max_new_tokens, temperature, top_p, top_k, seed, model_fingerprint, dtype, chat_template_sha256)", required=True),
        Option("--model", str, None, "the model directory the generations came from (only its tokenizer and config are read)",
               required=True),
        Option("--db", str, None, "DuckDB file", required=True),
        *GENERATION_OPTIONS,
        Option("--judge-answers", None, False, "the rows hold the answers too (generated through the answer)"),
        Option("--replace", None, False, "a prompt already stored with other reasoning gets the imported reasoning "
               "(default: the stored one is kept, and counted)"),
        Option("--json", None, False, "print the summary as one JSON object, the last line of stdout"),
        *MODEL_OPTIONS,
    ],
    run_generations_import,
    outputs=(Output("--db", appends=True),),
    inputs=("--model", "--data"),
)
