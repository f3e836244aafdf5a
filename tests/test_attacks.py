"""Steering attacks: the hook primitives do exactly what they claim and always
remove themselves; MoE edits work on fused experts and on module lists; the
attack kit round-trips; every attack mounts on the dense and MoE organisms;
the matrix runs and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from curation.cli.main import main
from curation.experiments.attack_kit import KitSettings, prepare_attack_kit
from curation.experiments.attacks import AttackExperiment, run_attack_experiment
from curation.experiments.budgeted_attacker import BudgetSettings
from probes.capture import capture_block_inputs, capture_residual, find_decoder_layers
from probes.directions import DirectionSettings, RefusalDirection
from probes.experts import (
    find_moe_layers,
    routing_frequencies,
    scale_expert_routing,
    shift_expert_outputs,
    single_expert_output,
)
from probes.models import LoadedModel, load_model
from probes.refusal import ProbeMismatchError
from probes.steering import ablate_direction, add_vector, orthogonalize_weights, orthogonalized
from training.attack_names import DENSE_ATTACKS, MOE_ATTACKS
from training.attacks import AttackKit, build_attack
from training.evaluate import EvalSettings, evaluate_prompts
from training.prompts import PromptItem, read_prompts

from .conftest import FMT

SMALL_KIT = KitSettings(
    n_extract=32, n_val=8, directions=DirectionSettings(n_positions=2, max_new_tokens=96),
    actadd_coefficients=(1.0, 2.0), benign_coefficients=(2.0,), steer_layers=(1,), expert_ks=(1, 2),
    expert_coefficients=(2.0,), max_new_tokens=96,
)


def _ids(lm: LoadedModel) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode("How do I bake bread? Please explain.", add_special_tokens=False)])


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def test_ablation_leaves_no_component_along_the_direction(lm: LoadedModel) -> None:
    d = torch.randn(lm.model.config.hidden_size)
    unit = d / d.norm()
    n = len(find_decoder_layers(lm.model))
    with ablate_direction(lm.model, d), capture_block_inputs(lm.model, range(n)) as inputs, \
            capture_residual(lm.model, [n - 1]) as outputs:
        lm.model(_ids(lm))
    for layer in range(n):
        assert inputs[layer].float().matmul(unit).abs().max() < 1e-4
    assert outputs[n - 1].float().matmul(unit).abs().max() < 1e-4
    assert _no_hooks(lm.model)


@torch.no_grad()
def test_orthogonalized_weights_match_hook_ablation_and_are_restored(lm: LoadedModel) -> None:
    d = torch.randn(lm.model.config.hidden_size)
    clean = lm.model(_ids(lm)).logits
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with ablate_direction(lm.model, d):
        hooked = lm.model(_ids(lm)).logits
    with orthogonalized(lm.model, d):
        edited = lm.model(_ids(lm)).logits
    assert torch.allclose(hooked, edited, atol=1e-4)
    assert not torch.allclose(clean, edited, atol=1e-3)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head, emb = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert head.weight is emb.weight  # the tie is back
    assert torch.allclose(lm.model(_ids(lm)).logits, clean)


def test_hooks_are_removed_when_the_body_raises(lm: LoadedModel) -> None:
    d = torch.randn(lm.model.config.hidden_size)
    for ctx in (ablate_direction(lm.model, d), add_vector(lm.model, d, [1], 2.0), orthogonalized(lm.model, d)):
        with pytest.raises(RuntimeError), ctx:
            raise RuntimeError("boom")
    assert _no_hooks(lm.model)


@torch.no_grad()
def test_add_vector_shifts_the_block_input_exactly(lm: LoadedModel) -> None:
    v = torch.randn(lm.model.config.hidden_size)
    with capture_block_inputs(lm.model, [1]) as clean:
        lm.model(_ids(lm))
    base = clean[1].clone()
    with add_vector(lm.model, v, [1], 0.5), capture_block_inputs(lm.model, [1]) as steered:
        lm.model(_ids(lm))
    assert torch.allclose(steered[1] - base, (0.5 * v).expand_as(base), atol=1e-5)


def test_export_orthogonalized_model_loads_without_hooks(organism_dir: Path, tmp_path: Path) -> None:
    lm = load_model(organism_dir)
    d = torch.randn(lm.model.config.hidden_size)
    with ablate_direction(lm.model, d):
        expected = lm.model(_ids(lm)).logits
    orthogonalize_weights(lm.model, d)
    lm.model.save_pretrained(tmp_path, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    reloaded = load_model(tmp_path)
    assert torch.allclose(reloaded.model(_ids(lm)).logits, expected, atol=1e-4)


# --- MoE -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_lm(moe_dir: Path) -> LoadedModel:
    return load_model(moe_dir)


def test_moe_layers_are_found_with_their_fused_experts(moe_lm: LoadedModel) -> None:
    layers = find_moe_layers(moe_lm.model)
    assert len(layers) == moe_lm.model.config.num_hidden_layers
    assert all(m.num_experts == 4 and m.top_k == 2 and m.spec.down_layout == "hidden_in" for m in layers)


@torch.no_grad()
def testsingle_expert_outputs_add_up_to_the_fused_module(moe_lm: LoadedModel) -> None:
    moe = find_moe_layers(moe_lm.model)[0]
    x = torch.randn(7, moe_lm.model.config.hidden_size)
    _, weights, index = moe.router(x)
    total = moe.experts(x, index, weights)
    rebuilt = torch.zeros_like(total)
    for t in range(x.shape[0]):
        for k in range(moe.top_k):
            rebuilt[t] += weights[t, k] * single_expert_output(moe, x[t : t + 1], int(index[t, k]))[0]
    assert torch.allclose(total, rebuilt, atol=1e-5)


@torch.no_grad()
def test_masked_expert_is_never_routed_to(moe_lm: LoadedModel) -> None:
    prompts = ["How do I bake bread?", "Tell me how to hurt someone."]
    layer = find_moe_layers(moe_lm.model)[1].layer
    before = routing_frequencies(moe_lm, prompts, FMT)
    assert before[1].sum().item() == pytest.approx(2.0)  # top-2: each token counts twice
    busiest = int(before[1].argmax())
    with scale_expert_routing(moe_lm.model, {(layer, busiest): 0.0}):
        after = routing_frequencies(moe_lm, prompts, FMT)
    assert after[1, busiest] == 0 and after[1].sum().item() == pytest.approx(2.0)
    assert torch.equal(after[0], before[0])  # other layers untouched
    with pytest.raises(ValueError, match="no such"):
        with scale_expert_routing(moe_lm.model, {(layer, 99): 0.0}):
            pass
    assert _no_hooks(moe_lm.model)


@torch.no_grad()
def test_expert_shift_applies_only_where_the_expert_is_routed(moe_lm: LoadedModel) -> None:
    moe = find_moe_layers(moe_lm.model)[0]
    x = torch.randn(9, moe_lm.model.config.hidden_size)
    _, weights, index = moe.router(x)
    shift = torch.randn(x.shape[1])
    clean = moe.experts(x, index, weights)
    with shift_expert_outputs(moe_lm.model, {(moe.layer, 0): shift}):
        shifted = moe.experts(x, index, weights)
    w0 = (weights * (index == 0)).sum(-1, keepdim=True)
    assert torch.allclose(shifted - clean, w0 * shift, atol=1e-5)
    assert _no_hooks(moe_lm.model)


# --- kits, attacks, CLI, matrix ---------------------------------------------------

@pytest.fixture(scope="module")
def dense_kit(lm: LoadedModel, organism_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kit = prepare_attack_kit(lm, read_prompts(organism_dir / "train_prompts.jsonl"), FMT, SMALL_KIT)
    return kit.save(tmp_path_factory.mktemp("kit") / "dense")


def test_dense_kit_round_trips_and_refuses_another_model(lm: LoadedModel, dense_kit: Path, moe_lm: LoadedModel) -> None:
    kit = AttackKit.load_for(dense_kit, lm)
    assert not kit.is_moe and set(kit.available()) == set(DENSE_ATTACKS)
    n_layers = lm.model.config.num_hidden_layers
    assert 1 <= kit.direction.layer < n_layers  # layer 0 has no difference at template tokens
    assert kit.direction.candidates and all(c.layer < n_layers for c in kit.direction.candidates)
    assert set(kit.strengths) >= {"actadd", "benign-compliance", "benign-json"}
    assert kit.strengths["actadd"]["coefficient"] in SMALL_KIT.actadd_coefficients
    # actadd: every (layer, position) at coefficient 1, then the other coefficients at the best place.
    assert len(kit.validation["actadd"]) == 2 * len(SMALL_KIT.steer_layers or ()) + 1
    assert torch.equal(kit.direction.at(kit.direction.layer, kit.direction.position), kit.direction.vector)
    assert set(kit.benign) == {"compliance", "json"}
    assert kit.generation["max_new_tokens"] == SMALL_KIT.max_new_tokens and kit.generation["sampling"]["temperature"] == 0.0
    with pytest.raises(ProbeMismatchError):
        AttackKit.load_for(dense_kit, moe_lm)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        build_attack("expert-route", kit)
    with pytest.raises(ValueError, match="--attack must be one of"):
        build_attack("nonsense", kit)
    direction = RefusalDirection.load_for(dense_kit / "direction", lm)
    assert torch.equal(direction.vector, kit.direction.vector)


def test_every_dense_attack_mounts_and_unmounts(lm: LoadedModel, dense_kit: Path, organism_dir: Path) -> None:
    kit = AttackKit.load_for(dense_kit, lm)
    items = [p for p in read_prompts(organism_dir / "heldout_prompts.jsonl")][:6]
    clean = lm.model(_ids(lm)).logits.detach()
    for name in DENSE_ATTACKS:
        attack = build_attack(name, kit)
        with attack.mount(lm, kit):
            r = evaluate_prompts(lm, [PromptItem(attack.wrap(p.prompt), p.harmful, p.category) for p in items], FMT,
                                 EvalSettings(max_new_tokens=64, keep_samples=False))
        assert r["n_harmful"] + r["n_harmless"] == len(items)
        assert _no_hooks(lm.model), name
    assert torch.allclose(lm.model(_ids(lm)).logits, clean)
    assert build_attack("template", kit).wrap("x").endswith(" x")


def test_moe_kit_tunes_and_mounts_every_expert_attack(moe_lm: LoadedModel, moe_dir: Path, tmp_path: Path) -> None:
    kit = prepare_attack_kit(moe_lm, read_prompts(moe_dir / "train_prompts.jsonl"), FMT, SMALL_KIT)
    kit.save(tmp_path / "kit")
    kit = AttackKit.load_for(tmp_path / "kit", moe_lm)
    assert kit.is_moe and set(MOE_ATTACKS) <= set(kit.available())
    assert kit.routing_harmful is not None and kit.routing_harmful.shape == (len(kit.moe_layers), 4)
    assert kit.expert_directions is not None and kit.expert_directions.shape[:2] == (len(kit.moe_layers), 4)
    sweep = kit.validation["single-expert"]
    assert len(sweep) == len(kit.moe_layers) * 4  # every single expert was tried
    assert kit.strengths["single-expert"] in [r["params"] for r in sweep]
    assert len(kit.refusal_experts(2)) == 2
    items = read_prompts(moe_dir / "heldout_prompts.jsonl")[:4]
    for name in MOE_ATTACKS:
        with build_attack(name, kit).mount(moe_lm, kit):
            evaluate_prompts(moe_lm, items, FMT, EvalSettings(max_new_tokens=48, keep_samples=False))
        assert _no_hooks(moe_lm.model), name


def test_cli_evaluate_with_an_attack(organism_dir: Path, dense_kit: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    items = read_prompts(organism_dir / "heldout_prompts.jsonl")[:5]
    prompts.write_text("".join(json.dumps({"prompt": i.prompt, "harmful": i.harmful, "category": i.category}) + "\n" for i in items))
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(organism_dir), "--prompts", str(prompts), "--out", str(out),
                 "--attack", "actadd", "--attack-kit", str(dense_kit), "--attack-params", '{"coefficient": 1.5}',
                 "--max-new-tokens", "48"])
    assert code == 0
    assert json.loads(out.read_text())["attack"] == {"name": "actadd", "params": {"coefficient": 1.5}}
    assert main(["evaluate", "--model", str(organism_dir), "--prompts", str(prompts), "--out", str(out),
                 "--attack", "ablate"]) == 2  # a kit is required


def test_attack_matrix_runs_and_resumes(organism_dir: Path, scored_db: Path, retain_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "organism").symlink_to(organism_dir)
    (work / "curate.duckdb").symlink_to(scored_db)
    (work / "retain.jsonl").symlink_to(retain_file)
    exp = AttackExperiment(workdirs={"dense": str(work)}, out=str(tmp_path / "attacks"), attacks=["none", "ablate"],
                           rows=["base", "cliff 1.7%", "cliff 1.7% robust"], kit=SMALL_KIT)
    exp.finetune.epochs = 2
    exp.eval_settings = EvalSettings(max_new_tokens=64, keep_samples=True)
    exp.budget = BudgetSettings(max_tries=3, alpha_fractions=(1.0,), ablate_candidates=1, curve_alphas=(1.0, 4.0))
    doc = run_attack_experiment(exp, FMT)
    (org,) = doc["organisms"]
    static = [c for c in org["cells"] if c["attacker"] == "base-tuned"]
    adaptive = [c for c in org["cells"] if c["attacker"] == "adaptive"]
    assert {(c["row"], c["attack"]) for c in static} == {(r, a) for r in exp.rows for a in exp.attacks}
    # The adaptive attacker re-tunes the attacks it reports (of those asked for) on every fine-tuned row.
    assert {(c["row"], c["attack"]) for c in adaptive} == {("cliff 1.7%", "ablate"), ("cliff 1.7% robust", "ablate")}
    # The budgeted attacker runs on every row, base included, and keeps within its budget on validation.
    budgeted = [c for c in org["cells"] if c["attacker"] == "adaptive-budgeted"]
    assert {(c["row"], c["attack"]) for c in budgeted} == {(r, "ablate") for r in exp.rows}
    for c in budgeted:
        assert c["kl_budget"] == exp.budget.kl_budget
        assert c["params"] is None or c["kl_validation"] <= exp.budget.kl_budget
    assert all(c["kl_harmless"] is not None and c["kl_harmless"] >= 0 for c in org["cells"])
    assert next(c for c in org["cells"] if c["attack"] == "none")["kl_harmless"] == pytest.approx(0.0, abs=1e-6)
    robust_meta = json.loads((tmp_path / "attacks" / "dense" / "runs" / "cliff_1.7pct_s0_robust" / "adapter" / "finetune.json").read_text())
    assert robust_meta["robust"]["hooks_left"] == 0 and robust_meta["robust"]["config"]["p"] == exp.robust.p
    assert robust_meta["robust"]["direction_layer"] == static[0]["direction_at"][0]  # the base kit's choice
    # Heat maps of the base-tuned, adaptive and budgeted attackers (no α curve: actadd was not asked for).
    assert (tmp_path / "attacks" / "attacks_experiment.html").read_text().count("data:image/png;base64") == 3
    # A rerun reuses every finished cell instead of evaluating again.
    monkeypatch.setattr("curation.experiments.attack_cells.cell", lambda *a, **k: pytest.fail("cell recomputed"))
    monkeypatch.setattr("curation.experiments.attack_cells.tune_budgeted", lambda *a, **k: pytest.fail("search rerun"))
    again = run_attack_experiment(exp, FMT)
    assert [c["asr"] for c in again["organisms"][0]["cells"]] == [c["asr"] for c in org["cells"]]


@pytest.mark.parametrize("verb", [["experiment", "attacks"], ["experiment", "selection"]])
def test_experiments_reject_a_batch_size_below_one(verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*verb, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
