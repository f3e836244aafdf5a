"""Every real-model recipe in manifests/ runs its stages end to end, with the
recipe's own settings (format, sampling, lengths, LoRA), against a tiny
random-weight model of its family; only the model path, the budgets and the
dtype (fp32 on CPU) are overridden.

A random-weight model neither refuses nor complies, so ``probe train`` has no
behaviour to learn from: the test saves a random probe for the model instead
(the probe's training is covered on the organism in test_probes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curation.cli.main import main
from curation.cli.recipes import thinking_format, validate_manifest
from probes.chat import build_completion
from probes.families import family_for_architecture
from probes.models import model_hidden_size
from probes.refusal import ProbeMetadata, RefusalProbe, compute_probe_id
from tests.families.build import TINY_FAMILIES

RECIPES = [p for p in sorted((Path(__file__).parent.parent / "manifests").glob("*.yaml")) if p.stem not in ("demo", "nightly")]
SMALL = ["--max-new-tokens", "10", "--answer-tokens", "6", "--dtype", "float32", "--device", "cpu"]
PROMPTS = ["How do I grow tomatoes?", "Explain how vaccines are tested.", "Write a haiku about rain.",
           "What is a refusal direction?", "Summarise the water cycle.", "How do bridges carry load?"]


def test_every_family_of_a_recipe_is_supported() -> None:
    families = {family_for_architecture(validate_manifest(p)[0].recipe.architecture).name for p in RECIPES}
    assert families <= set(TINY_FAMILIES)
    assert {"qwen2", "llama", "qwen3", "qwen3_moe", "gpt_oss", "phi3"} <= families


def _random_probe(model_dir: Path, out: Path) -> Path:
    from probes.models import load_model

    lm = load_model(model_dir)
    weight = torch.randn(model_hidden_size(lm), generator=torch.Generator().manual_seed(0))
    meta = ProbeMetadata(layer=1, hidden_size=weight.numel(), model_fingerprint=lm.fingerprint)
    meta.probe_id = compute_probe_id(weight, 0.0, 1, lm.fingerprint, meta.position)
    return RefusalProbe(weight, 0.0, meta).save(out) and out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_end_to_end_on_its_familys_tiny_model(recipe: Path, tiny_dirs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    manifest, raw = validate_manifest(recipe)
    family = family_for_architecture(manifest.recipe.architecture)
    result = _run_stages(["--config", str(recipe)], tiny_dirs[family.name], thinking_format(raw), tmp_path, capsys)
    # The recipe's sampling reached generation and is recorded with the result.
    assert result["sampling"]["temperature"] == raw["temperature"] and result["sampling"]["top_p"] == raw["top_p"]


_RECIPE_FAMILIES = {family_for_architecture(validate_manifest(p)[0].recipe.architecture).name for p in RECIPES}


@pytest.mark.parametrize("name", sorted(set(TINY_FAMILIES) - _RECIPE_FAMILIES))
def test_families_without_a_recipe_run_end_to_end_with_the_defaults(name: str, tiny_dirs: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from probes.families import FAMILIES

    result = _run_stages([], tiny_dirs[name], FAMILIES[name].thinking, tmp_path, capsys)
    assert result["sampling"]["temperature"] == 0.0  # greedy unless asked


def _run_stages(cfg: list[str], model: Path, fmt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*cfg, "doctor", "--model", str(model), "--dtype", "float32", "--json"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    pool = tmp_path / "pool.jsonl"
    from probes.models import load_model

    end = load_model(model).end_tokens[0]
    pool.write_text("".join(json.dumps({"id": f"c{i}", "prompt": p, "category": "demo",
                                        # as the model writes it: its own end-of-turn token last
                                        "response": build_completion(f"Thinking about {p.lower()}", "A short, safe answer.", fmt)
                                        + end})
                            + "\n" for i, p in enumerate(PROMPTS)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "harmful": i % 2 == 0, "category": "demo"}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    probe = _random_probe(model, tmp_path / "probe")
    db, slice_file, adapter = tmp_path / "c.duckdb", tmp_path / "slice.jsonl", tmp_path / "adapter"

    assert main([*cfg, "score", "--model", str(model), "--probe", str(probe), "--data", str(pool), "--db", str(db), *SMALL]) == 0
    # Ten tokens of a random model rarely close: the selection keeps unclosed rows only when asked to.
    assert main([*cfg, "select", "--db", str(db), "--out", str(slice_file), "--budget", "3", "--include-unclosed"]) == 0
    selected = [json.loads(line) for line in slice_file.read_text().splitlines()]
    assert len(selected) == 3
    # The candidates' own targets, split in the format the store recorded for the pool (no --model
    # given): the reasoning and the answer come back as written, with the end token gone.
    candidate_slice = tmp_path / "candidate.jsonl"
    assert main([*cfg, "select", "--db", str(db), "--out", str(candidate_slice), "--budget", "3", "--include-unclosed",
                 "--target", "candidate"]) == 0
    for row in map(json.loads, candidate_slice.read_text().splitlines()):
        assert (row["reasoning"], row["answer"]) == (f"Thinking about {row['prompt'].lower()}", "A short, safe answer."), row
    assert main([*cfg, "finetune", "--model", str(model), "--data", str(slice_file), "--out", str(adapter),
                 "--epochs", "1", "--dtype", "float32", "--device", "cpu"]) == 0
    assert (adapter / "adapter_model.safetensors").exists()
    out = tmp_path / "eval.json"
    assert main([*cfg, "evaluate", "--model", str(model), "--adapter", str(adapter), "--prompts", str(prompts),
                 "--out", str(out), *SMALL]) == 0
    result = json.loads(out.read_text())
    unclosed = result["n_unclosed_harmful"] + result["n_unclosed_harmless"]
    assert unclosed > 0.2 * len(PROMPTS)
    assert f"evaluate: {unclosed}/{len(PROMPTS)} traces" in capsys.readouterr().err
    return result
