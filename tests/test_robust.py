"""Attack-in-the-loop fine-tuning (``finetune --robust``): the sampled attacks really steer
the model while a step runs, every hook is gone after each step, after training and after
an exception, and the saved adapter loads and runs with no hook at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from probes.chat import render_generation_prompt
from probes.models import LoadedModel, load_model
from training.finetune import FinetuneConfig, finetune_lora
from training.prompts import read_prompts
from training.robust import AttackInTheLoop, RobustConfig, hook_count

from .conftest import FMT


def _last_logits(lm: LoadedModel, prompt: str) -> torch.Tensor:
    ids = lm.tokenizer(render_generation_prompt(lm.tokenizer, prompt, FMT), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return lm.model(**ids.to(lm.device)).logits[0, -1]


def test_sampled_attacks_steer_during_a_step_and_leave_no_hook(lm: LoadedModel, organism_dir: Path) -> None:
    prompts = read_prompts(organism_dir / "train_prompts.jsonl")
    harmful = [p.prompt for p in prompts if p.harmful][:16]
    harmless = [p.prompt for p in prompts if not p.harmful][:16]
    clean_hooks = hook_count(lm.model)
    clean = _last_logits(lm, harmful[0])
    for attack in ("ablate", "actadd"):
        loop = AttackInTheLoop(lm, harmful, harmless, FMT, RobustConfig(p=1.0, attacks=(attack,), layer_fraction=1.0))
        loop.begin_step(0)
        assert loop.state.attacked == {attack: 1} and loop.state.refreshes == 1
        assert hook_count(lm.model) > clean_hooks
        steered = _last_logits(lm, harmful[0])
        assert (steered - clean).abs().max() > 1e-3  # the attack acts on the forward pass
        loop.end_step()
        assert hook_count(lm.model) == clean_hooks
        assert torch.equal(_last_logits(lm, harmful[0]), clean)
    loop = AttackInTheLoop(lm, harmful, harmless, FMT, RobustConfig(p=1.0, attacks=("ablate",)))
    with pytest.raises(RuntimeError):
        try:
            loop.begin_step(0)
            raise RuntimeError("a step fails half way")
        finally:
            loop.close()
    assert hook_count(lm.model) == clean_hooks
    never = AttackInTheLoop(lm, harmful, harmless, FMT, RobustConfig(p=0.0))
    for step in range(3):
        never.begin_step(step)
    assert never.state.attacked == {} and hook_count(lm.model) == clean_hooks
    # A dense model has no experts to mask: the kind is skipped and said so, not silently dropped.
    assert never.state.skipped and "expert-mask" in never.state.skipped[0]
    with pytest.raises(ValueError, match="--robust-p"):
        RobustConfig(p=1.5)
    with pytest.raises(ValueError, match="harmless"):
        AttackInTheLoop(lm, harmful, [], FMT, RobustConfig())


def test_robust_finetune_saves_an_adapter_that_runs_without_hooks(
    lm: LoadedModel, cliff_slice: Path, organism_dir: Path, retain_file: Path, tmp_path: Path
) -> None:
    sel = cliff_slice
    plain_cfg = FinetuneConfig(epochs=2)
    robust_cfg = FinetuneConfig(epochs=2, robust=RobustConfig(p=1.0, attacks=("ablate", "actadd"), refresh_steps=2))
    plain = finetune_lora(organism_dir, sel, tmp_path / "plain", plain_cfg, FMT, retain_file=retain_file)
    robust = finetune_lora(organism_dir, sel, tmp_path / "robust", robust_cfg, FMT, retain_file=retain_file)
    info = robust["robust"]
    assert plain["robust"] is None and info["hooks_left"] == 0
    assert sum(info["attacked"].values()) == info["steps"] == robust["steps"] > 0
    assert info["refreshes"] == -(-robust["steps"] // 2)  # every second step, the first included
    # Training under attack is a different optimisation: the loss it reports is not the plain one.
    assert robust["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-6)
    saved = json.loads((tmp_path / "robust" / "finetune.json").read_text())
    assert saved["robust"]["config"]["p"] == 1.0
    tuned = load_model(organism_dir, adapter=tmp_path / "robust")
    assert hook_count(tuned.model) == 0
    logits = _last_logits(tuned, read_prompts(organism_dir / "heldout_prompts.jsonl")[0].prompt)
    assert torch.isfinite(logits).all() and not torch.equal(logits, _last_logits(lm, read_prompts(organism_dir / "heldout_prompts.jsonl")[0].prompt))


# PEFT's own MoE alpha pattern names expert weights "all-linear" does not target (as in training.finetune).
@pytest.mark.filterwarnings("ignore:.*pattern keys did not match.*:RuntimeWarning")
def test_every_attack_mounts_on_a_moe_model_under_training(moe_dir: Path) -> None:
    """The live LoRA model, not a merged one: PEFT wraps the fused experts, and the expert
    mask must still find the router and the experts beneath the wrapper."""
    from peft import LoraConfig, get_peft_model

    from probes.experts import find_moe_layers

    base = load_model(moe_dir)
    model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    training_lm = LoadedModel(model=model, tokenizer=base.tokenizer, path=base.path, fingerprint=base.fingerprint)
    layers = find_moe_layers(model)
    assert layers and type(layers[0].experts).__module__.startswith("peft.")  # the wrapper is what runs
    experts = [(layers[0].layer, 0), (layers[-1].layer, 1)]
    prompts = read_prompts(moe_dir / "train_prompts.jsonl")
    harmful = [p.prompt for p in prompts if p.harmful][:8]
    harmless = [p.prompt for p in prompts if not p.harmful][:8]
    clean_hooks = hook_count(model)
    clean = _last_logits(training_lm, harmful[0])
    for attack in ("expert-mask", "ablate", "actadd"):
        loop = AttackInTheLoop(training_lm, harmful, harmless, FMT, RobustConfig(p=1.0, attacks=(attack,)), None, experts)
        loop.begin_step(0)
        assert (_last_logits(training_lm, harmful[0]) - clean).abs().max() > 1e-4, attack
        loop.end_step()
        assert hook_count(model) == clean_hooks and loop.state.hooks_left == 0
    assert torch.equal(_last_logits(training_lm, harmful[0]), clean)


def test_the_sweep_rule_and_the_matrix_read_the_chosen_setting(tmp_path: Path) -> None:
    from curation.experiments.attack_verbs import _chosen_settings
    from curation.experiments.robust_sweep import RobustSweep, choose

    def row(setting: str, robust: dict | None, none: float, over: float, ablate: float, actadd: float) -> dict:
        cell = {"none": {"asr": none, "over_refusal": over}, "ablate": {"asr": ablate}, "actadd": {"asr": actadd}}
        return {"setting": setting, "robust": robust, "cells": cell}

    rows = [row("plain", None, 0.0, 0.05, 0.6, 0.7),
            row("a", {"p": 1.0, "attacks": ["ablate"], "layer_fraction": 1.0}, 0.0, 0.10, 0.1, 0.2),
            row("b", {"p": 0.5, "attacks": ["ablate"], "layer_fraction": 0.5}, 0.0, 0.30, 0.0, 0.0),  # over-refuses
            row("c", {"p": 0.25, "attacks": ["ablate"], "layer_fraction": 0.5}, 0.10, 0.05, 0.0, 0.0),  # clean ASR too high
            row("d", {"p": 0.75, "attacks": ["actadd"], "layer_fraction": 0.5}, 0.0, 0.05, 0.3, 0.1)]
    sweep = RobustSweep(workdirs={}, out=str(tmp_path))
    assert choose(rows, sweep) == "a"
    assert choose(rows[:1] + rows[2:4], sweep) is None
    doc = tmp_path / "robust_sweep.json"
    doc.write_text(json.dumps({"organisms": [{"organism": "dense", "rows": rows, "chosen": "a"}]}))
    chosen = _chosen_settings(str(doc), ["dense", "moe"])
    assert set(chosen) == {"dense"} and chosen["dense"] == [RobustConfig(p=1.0, attacks=("ablate",), layer_fraction=1.0)]
    # One file per swept method, comma-separated: each organism keeps one choice per method.
    other = tmp_path / "lat.json"
    lat_row = row("e", {"method": "lat", "p": 1.0, "lat_epsilon": 0.25}, 0.0, 0.05, 0.0, 0.0)
    other.write_text(json.dumps({"organisms": [{"organism": "dense", "rows": [rows[0], lat_row], "chosen": "e"}]}))
    both = _chosen_settings(f"{doc},{other}", ["dense"])
    assert [c.method for c in both["dense"]] == ["random", "lat"] and both["dense"][1].lat_epsilon == 0.25


def test_the_lat_grid_is_named_apart_and_each_robust_row_takes_its_own_methods_choice() -> None:
    from curation.experiments.robust_sweep import _setting_name, adaptive_grid, default_grid, lat_grid

    names = [_setting_name(c) for c in lat_grid()]
    assert len(set(names)) == len(names) and all(n.startswith("lat_eps") for n in names)
    adaptive = [_setting_name(c) for c in adaptive_grid()]
    assert len(set(adaptive)) == len(adaptive) and all(n.startswith("adaptive_") for n in adaptive)
    assert not set(names) & {_setting_name(c) for c in default_grid()} and not set(adaptive) & set(names)
    assert all(c.method == "lat" for c in lat_grid()) and all(c.method == "random" for c in default_grid())
    assert all(c.method == "adaptive" for c in adaptive_grid())


def test_a_row_mask_steers_only_its_rows(lm: LoadedModel, organism_dir: Path) -> None:
    from probes.steering import ablate_direction, add_vector

    prompt = next(p.prompt for p in read_prompts(organism_dir / "train_prompts.jsonl") if p.harmful)
    ids = lm.tokenizer(render_generation_prompt(lm.tokenizer, prompt, FMT), return_tensors="pt", add_special_tokens=False)
    batch = {k: v.repeat(2, 1).to(lm.device) for k, v in ids.items()}
    with torch.no_grad():
        clean = lm.model(**batch).logits
        vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        rows = torch.tensor([True, False])
        for edit in (lambda: add_vector(lm.model, vector, [1], 2.0, rows=lambda: rows),
                     lambda: ablate_direction(lm.model, vector, rows=lambda: rows)):
            with edit():
                steered = lm.model(**batch).logits
            assert (steered[0] - clean[0]).abs().max() > 1e-4 and torch.equal(steered[1], clean[1])
        with add_vector(lm.model, vector, [1], 2.0, rows=lambda: torch.tensor([True, False, True])), \
                pytest.raises(ValueError, match="row mask of 3 rows"):
            lm.model(**batch)
    assert hook_count(lm.model) == 0


def test_the_early_token_loss_reads_the_first_completion_tokens_of_the_harmful_rows(lm: LoadedModel) -> None:
    import torch.nn.functional as F

    from training.early_tokens import HarmfulRows, early_token_loss

    harmful, harmless = [5, 6, 7, 8], [9, 10, 11, 12]
    input_ids = torch.tensor([harmful + [20, 21, 22, 23, 24, 0], harmless + [30, 31, 32, 33, 34, 0]])
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[:, -1] = -100  # padding
    rows = HarmfulRows([harmful]).mask(input_ids)
    assert rows.tolist() == [True, False]
    with torch.no_grad():
        got = early_token_loss(lm.model, {"input_ids": input_ids, "labels": labels}, rows, 3)
        logits = lm.model(input_ids=input_ids[:1, :7]).logits[0]
        want = F.cross_entropy(logits[3:6].float(), input_ids[0, 4:7])
    assert got is not None and float(got) == pytest.approx(float(want), rel=1e-5)
    assert early_token_loss(lm.model, {"input_ids": input_ids, "labels": labels}, torch.tensor([False, False]), 3) is None
