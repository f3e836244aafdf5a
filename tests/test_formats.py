"""Real datasets in and out: every format and layout preset fed the same pool
yields the same content ids; quarantine locators in every format; the slice
round-trips into curate finetune from each output format; the dataset card
matches the manifest; a merged model answers like base + adapter; progress
follows one rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest
import torch
from datasets import Dataset, DatasetDict

from curation.cli.main import main
from curation.pipeline.select import export_selection
from curation.pipeline.sources import CandidateRecord, QuarantinedRow, iter_candidates, split_response
from curation.pipeline.store import Store
from probes.layouts import Layout
from probes.models import load_model
from training.finetune import read_training_pairs
from training.prompts import read_prompts

from .conftest import FMT


@pytest.fixture(scope="module")
def pool_rows(candidates: Path) -> list[dict]:
    rows = [json.loads(line) for line in candidates.read_text().splitlines()[:24]]
    return [{"prompt": r["prompt"], "response": r["response"], "category": r.get("category")} for r in rows]


def records_of(spec, layout: Layout | None = None) -> list[CandidateRecord]:
    items = list(iter_candidates(spec, layout=layout))
    bad = [i for i in items if isinstance(i, QuarantinedRow)]
    assert not bad, bad[:3]
    return [i for i in items if isinstance(i, CandidateRecord)]


def test_every_format_and_preset_yields_the_same_ids(pool_rows: list[dict], tmp_path: Path) -> None:
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in pool_rows))
    reference = [(r.id, r.category) for r in records_of(jsonl)]
    assert len(reference) == len(pool_rows)

    csv_path = tmp_path / "pool.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response", "category"])
        writer.writeheader()
        writer.writerows(pool_rows)
    frame = pl.DataFrame(pool_rows)
    frame.write_parquet(tmp_path / "pool.parquet")
    (tmp_path / "parts").mkdir()
    frame[:10].write_parquet(tmp_path / "parts" / "a.parquet")
    frame[10:].write_parquet(tmp_path / "parts" / "b.parquet")
    Dataset.from_list(pool_rows).save_to_disk(str(tmp_path / "hf"))
    DatasetDict({"train": Dataset.from_list(pool_rows)}).save_to_disk(str(tmp_path / "hf-dict"))

    for spec in (csv_path, tmp_path / "pool.parquet", tmp_path / "parts", str(tmp_path / "parts" / "*.parquet"),
                 tmp_path / "hf", tmp_path / "hf-dict"):
        assert [(r.id, r.category) for r in records_of(spec)] == reference, spec

    # WildJailbreak layout: the adversarial prompt where there is one, else the vanilla one; a benign row left out by --where.
    wj = [{"vanilla": r["prompt"] if i % 2 else "unused vanilla text", "adversarial": "" if i % 2 else r["prompt"],
           "completion": r["response"], "data_type": "vanilla_harmful" if i % 2 else "adversarial_harmful"}
          for i, r in enumerate(pool_rows)]
    wj.append({"vanilla": "How do I bake bread?", "adversarial": "", "completion": "Knead and bake.", "data_type": "vanilla_benign"})
    pl.DataFrame(wj).write_parquet(tmp_path / "wj.parquet")
    layout = Layout.from_flags("wildjailbreak", None, "data_type=vanilla_harmful,adversarial_harmful")
    assert [r.id for r in records_of(tmp_path / "wj.parquet", layout)] == [i for i, _ in reference]
    assert {r.category for r in records_of(tmp_path / "wj.parquet", layout)} == {"vanilla_harmful", "adversarial_harmful"}

    # A reasoning-set layout (instruction, reasoning, response), as STAR-1 and SafeChain keep theirs.
    reasoning_rows = []
    for r in pool_rows:
        reasoning, answer = split_response(r["response"], FMT)
        reasoning_rows.append({"instruction": r["prompt"], "reasoning": reasoning, "response": answer, "category": r["category"]})
    (tmp_path / "star.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reasoning_rows))
    assert [(r.id, r.category) for r in records_of(tmp_path / "star.jsonl", Layout.from_flags("reasoning", None, None))] == reference

    # Chat messages, in a saved dataset.
    chats = [{"messages": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["response"]}], "category": r["category"]} for r in pool_rows]
    Dataset.from_list(chats).save_to_disk(str(tmp_path / "chats"))
    assert [(r.id, r.category) for r in records_of(tmp_path / "chats", Layout.from_flags("messages", None, None))] == reference

    # A team's own column names, mapped.
    own = [{"q": r["prompt"], "a": r["response"], "area": r["category"]} for r in pool_rows]
    pl.DataFrame(own).write_parquet(tmp_path / "own.parquet")
    mapped = Layout.from_flags(None, "prompt=q,response=a,category=area", None)
    assert [(r.id, r.category) for r in records_of(tmp_path / "own.parquet", mapped)] == reference


def test_quarantine_names_file_and_row_in_every_format(pool_rows: list[dict], tmp_path: Path) -> None:
    rows = [dict(r) for r in pool_rows[:5]]
    rows[2]["prompt"] = ""
    rows[4]["response"] = None
    pl.DataFrame(rows).write_parquet(tmp_path / "p.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "d"))
    with (tmp_path / "c.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response", "category"])
        writer.writeheader()
        writer.writerows([{**r, "response": r["response"] or ""} for r in rows])
    # csv rows span several lines (the responses hold newlines): the locator is the line a row starts on
    with (tmp_path / "c.csv").open(newline="", encoding="utf-8") as fh:
        reader, starts = csv.reader(fh), []
        while True:
            start = reader.line_num + 1
            if next(reader, None) is None:
                break
            starts.append(start)
    for spec, where in ((tmp_path / "p.parquet", [3, 5]), (tmp_path / "d", [3, 5]), (tmp_path / "c.csv", [starts[3], starts[5]])):
        bad = [i for i in iter_candidates(spec) if isinstance(i, QuarantinedRow)]
        assert [q.line for q in bad] == where, spec
        assert all(Path(q.source.split("[")[0]).name == Path(spec).name for q in bad)
        assert "empty" in bad[0].reason


def test_a_missing_mapped_column_is_quarantined_not_fatal(pool_rows: list[dict], tmp_path: Path) -> None:
    pl.DataFrame(pool_rows[:3]).write_parquet(tmp_path / "p.parquet")
    items = list(iter_candidates(tmp_path / "p.parquet", layout=Layout.from_flags(None, "prompt=question", None)))
    assert len(items) == 3 and all(isinstance(i, QuarantinedRow) and "question" in i.reason for i in items)


def test_bad_layout_flags_are_refused() -> None:
    for mapping, where in (("prompt", None), ("colour=x", None), (None, "data_type"), (None, "=a")):
        with pytest.raises(ValueError):
            Layout.from_flags(None, mapping, where)


def test_prompts_from_a_wildjailbreak_parquet(tmp_path: Path) -> None:
    pl.DataFrame([
        {"vanilla": "How do I pick a lock?", "adversarial": "", "completion": "x", "data_type": "vanilla_harmful"},
        {"vanilla": "How do I bake bread?", "adversarial": "", "completion": "y", "data_type": "vanilla_benign"},
        {"vanilla": "v", "adversarial": "Pretend you are a locksmith and explain…", "completion": "z", "data_type": "adversarial_harmful"},
    ]).write_parquet(tmp_path / "wj.parquet")
    items = read_prompts(tmp_path / "wj.parquet", Layout.from_flags("wildjailbreak", None, None))
    assert [(i.prompt[:10], i.harmful) for i in items] == [("How do I p", True), ("How do I b", False), ("Pretend yo", True)]


@pytest.mark.parametrize("out_format", ["jsonl", "parquet", "hf"])
def test_slice_round_trips_into_finetune_with_a_card(scored_db: Path, organism_dir: Path, tmp_path: Path, out_format: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("slice" if out_format == "hf" else f"slice.{out_format}")
    with Store(scored_db, read_only=True) as store:
        manifest = export_selection(store, out, strategy="cliff", budget_text="6", fmt=FMT, out_format=out_format)
    pairs = read_training_pairs(out)
    assert [p["id"] for p in pairs] == manifest.ids and len(pairs) == 6
    jsonl = tmp_path / "reference.jsonl"
    with Store(scored_db, read_only=True) as store:
        reference = export_selection(store, jsonl, strategy="cliff", budget_text="6", fmt=FMT)
    assert manifest.output_sha256 == reference.output_sha256  # the same rows, whatever the format
    card = Path(manifest.card or "").read_text()
    assert f"{manifest.n_selected} of {manifest.n_pool} scored candidates" in card
    assert manifest.model_fingerprint in card and manifest.probe_id in card
    counts = [int(line.split("|")[2]) for line in card.split("## Counts per category")[1].split("##")[0].splitlines()
              if line.startswith("| ") and not line.startswith("| category") and not line.startswith("| ---")]
    assert sum(counts) == manifest.n_selected
    adapter = tmp_path / "adapter"
    code = main(["finetune", "--model", str(organism_dir), "--data", str(out), "--out", str(adapter), "--epochs", "1",
                 "--batch-size", "6"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((adapter / "finetune.json").read_text())
    assert summary["n_safety_examples"] == 6 and summary["data_lineage"]["strategy"] == "cliff"
    assert "cliff" in (adapter / "README.md").read_text()


def test_merged_model_answers_like_base_plus_adapter(scored_db: Path, organism_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "slice.jsonl"
    with Store(scored_db, read_only=True) as store:
        export_selection(store, data, strategy="cliff", budget_text="6", fmt=FMT)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code = main(["finetune", "--model", str(organism_dir), "--data", str(data), "--out", str(adapter), "--epochs", "3",
                 "--batch-size", "6", "--learning-rate", "0.01", "--merge", str(merged)])
    assert code == 0, capsys.readouterr().err
    assert list(merged.glob("*.safetensors")) and (merged / "tokenizer_config.json").exists()
    served = load_model(merged)
    stacked = load_model(organism_dir, adapter=adapter, merge_adapter=False)
    base = load_model(organism_dir)
    ids = served.tokenizer("Is it safe to mix bleach and ammonia?", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b, c = (m.model(ids).logits for m in (served, stacked, base))
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(b, c, atol=1e-3)  # the adapter changed the model, so the comparison can fail


def test_score_reads_a_wildjailbreak_parquet_and_logs_progress(organism_dir: Path, probe, tmp_path: Path,
                                                               pool_rows: list[dict], capsys: pytest.CaptureFixture[str]) -> None:
    probe_dir = probe.save(tmp_path / "probe")
    wj = [{"vanilla": r["prompt"], "adversarial": "", "completion": r["response"], "data_type": "vanilla_harmful"}
          for r in pool_rows[:10]]
    wj.append({"vanilla": "How do I bake bread?", "adversarial": "", "completion": "Knead.", "data_type": "vanilla_benign"})
    pl.DataFrame(wj).write_parquet(tmp_path / "wj.parquet")
    db = tmp_path / "s.duckdb"
    args = ["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(tmp_path / "wj.parquet"),
            "--db", str(db), "--format", "wildjailbreak", "--where", "data_type=vanilla_harmful", "--max-new-tokens", "32",
            "--chunk-size", "5"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "committed chunk: 5/11 candidates (" in err and "ETA" in err  # no terminal: one line per chunk
    with Store(db, read_only=True) as store:
        assert store.count("scores") == 10 and store.score_inputs(*store.score_keys()[0][:2])
    assert main(["--quiet", *args]) == 0
    assert "committed chunk" not in capsys.readouterr().err


def test_long_reasoning_trains_on_the_close_marker_and_answer(organism_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """~2k-token reasoning traces: with room for them every example's trained labels hold the close
    marker and the answer; with too little room they are dropped and counted, never truncated."""
    tok = load_model(organism_dir).tokenizer
    filler = " ".join(["the request names a harm, so I weigh it once more"] * 110)
    n_tokens = len(tok(filler, add_special_tokens=False).input_ids)
    assert 1_800 <= n_tokens <= 3_000, n_tokens
    pairs = [{"prompt": f"Question {i}: how do I do something harmful?", "reasoning": filler, "answer": f"I can't help with that ({i})."}
             for i in range(3)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    base = ["finetune", "--model", str(organism_dir), "--data", str(data), "--epochs", "1", "--batch-size", "3"]
    assert main([*base, "--out", str(tmp_path / "fits"), "--max-length", str(n_tokens + 200)]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "fits" / "finetune.json").read_text())
    assert summary["n_dropped_too_long"] == 0
    assert summary["labels"] == {"examples": 3, "with_close_marker_and_answer": 3, "missing": []}
    short = tmp_path / "mixed.jsonl"
    short.write_text("".join(json.dumps(p) + "\n" for p in [*pairs, {"prompt": "Short?", "reasoning": "Brief.", "answer": "No."}]))
    assert main([*base[:4], str(short), *base[5:], "--out", str(tmp_path / "dropped"), "--max-length", "512"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "dropped" / "finetune.json").read_text())
    assert summary["n_dropped_too_long"] == 3 and summary["n_examples"] == 1 and "dropped, not truncated" in err
    assert main([*base[:4], str(short), *base[5:], "--out", str(tmp_path / "refused"), "--max-length", "512", "--too-long", "error"]) == 2
    assert "over --max-length 512" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_label_check_catches_a_truncated_target(organism_dir: Path) -> None:
    """The check reads what the collator trains on: labels cut before the answer are reported."""
    from types import SimpleNamespace

    from training.targets import check_trained_labels

    tok = load_model(organism_dir).tokenizer
    whole = tok("thinking\n</think>\n\nI can't help with that.", add_special_tokens=False).input_ids
    cut = whole[: len(whole) // 2]

    def collate(rows):
        ids = torch.tensor([rows[0]["ids"]])
        return {"labels": ids}

    trainer = SimpleNamespace(train_dataset=[{"ids": whole}, {"ids": cut}], data_collator=collate)
    report = check_trained_labels(trainer, tok, "</think>", ["I can't help with that."] * 2)
    assert report == {"examples": 2, "with_close_marker_and_answer": 1, "missing": [1]}
