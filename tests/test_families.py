"""Conformance suite: every supported family's tiny random-weight model passes
``curate doctor``, and each check is shown to catch a deliberately wrong edit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import probes.doctor as doctor
from curation.cli.main import main
from probes.capture import find_decoder_layers
from probes.chat import ThinkingFormat, build_completion, split_completion
from probes.experts import find_moe_layers, route, scale_expert_routing
from probes.families import FAMILIES, HARMONY, UnsupportedModelError, family_for_dir, family_of, use_family
from probes.models import LoadedModel, load_model
from probes.steering import ablate_direction, orthogonalized
from tests.families.build import TINY_FAMILIES

_LOADED: dict[str, LoadedModel] = {}


def tiny(tiny_dirs: dict[str, Path], name: str) -> LoadedModel:
    if name not in _LOADED:
        _LOADED[name] = load_model(tiny_dirs[name])
    return _LOADED[name]


def doctor_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["doctor", "--json", *map(str, argv)])
    out = capsys.readouterr().out
    return code, json.loads(out)


def failed(results: list[doctor.CheckResult]) -> list[str]:
    return [r.name for r in results if not r.passed]


def test_every_declared_family_has_a_tiny_model() -> None:
    assert set(TINY_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_doctor_passes_on_every_family(name: str, tiny_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = doctor_json(capsys, "--model", tiny_dirs[name])
    assert code == 0, [c for c in doc["checks"] if not c["passed"]]
    assert doc["family"] == name and doc["passed"]
    names = {c["name"] for c in doc["checks"]}
    assert "orthogonalisation = ablation" in names and "engine trace = output_hidden_states" in names
    if FAMILIES[name].is_moe:
        assert {"router edit at scale 1 is the identity", "masked expert receives no tokens",
                "experts add up to the MoE block"} <= names


def test_doctor_exits_nonzero_naming_the_check_on_the_old_gpt_oss_orientation(
        tiny_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # The defect this suite was written for: gpt-oss's down_proj is [experts, intermediate, hidden];
    # edited as if it were [experts, hidden, intermediate] (indistinguishable by shape here, as in the
    # real model) the weight edit no longer matches the hooks.
    code, doc = doctor_json(capsys, "--model", tiny_dirs["gpt_oss"], "--adapter", '{"experts": {"down_layout": "hidden_in"}}')
    assert code == 1 and not doc["passed"]
    bad = [c for c in doc["checks"] if not c["passed"]]
    assert [c["name"] for c in bad] == ["orthogonalisation = ablation"] and bad[0]["figure"] > 1e-2
    main(["doctor", "--model", str(tiny_dirs["gpt_oss"]), "--adapter", '{"experts": {"down_layout": "hidden_in"}}'])
    assert "failed: orthogonalisation = ablation" in capsys.readouterr().out


@pytest.mark.parametrize("name, wrong", [
    ("mixtral", {"renormalize": "never"}),  # Mixtral always renormalises its top-k
    ("gpt_oss", {"scoring": "softmax"}),  # gpt-oss takes top-k of logits, then softmax over the k
    ("deepseek_v3", {"scoring": "softmax", "groups": None, "selection_bias": None}),  # sigmoid, grouped, biased choice
    ("deepseek_v3", {"groups": None}),
])
def test_routing_that_is_not_the_familys_own_is_caught(name: str, wrong: dict, tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, name)
    family = family_of(lm.model)
    use_family(lm.model, replace(family, router=replace(family.router, **wrong)))
    try:
        results = doctor.run_doctor(lm, family.thinking)
    finally:
        use_family(lm.model, None)
    assert "router edit at scale 1 is the identity" in failed(results)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe", "olmoe"])
def test_routing_recomputed_by_the_adapter_equals_the_models_own(name: str, tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, name)
    x = torch.randn(40, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for moe in find_moe_layers(lm.model):
        logits, weights, indices = moe.router(x)
        ours_w, ours_i = route(moe, logits)
        order, ours_order = indices.sort(-1), ours_i.sort(-1)
        assert torch.equal(order.values, ours_order.values)
        assert torch.allclose(weights.gather(1, order.indices), ours_w.gather(1, ours_order.indices), atol=1e-6)


def test_masking_that_does_not_mask_is_caught(tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import probes.experts as experts

    lm = tiny(tiny_dirs, "qwen3_moe")
    real_route = experts.route
    monkeypatch.setattr(experts, "route", lambda moe, logits, scales=None: real_route(moe, logits))
    results = doctor.run_doctor(lm, family_of(lm.model).thinking)
    assert failed(results) == ["masked expert receives no tokens"]


def test_expert_sum_without_shared_experts_is_caught(tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, "deepseek_v3")
    family = family_of(lm.model)
    use_family(lm.model, replace(family, experts=replace(family.experts, shared=None)))
    try:
        results = doctor.run_doctor(lm, family.thinking)
    finally:
        use_family(lm.model, None)
    assert "experts add up to the MoE block" in failed(results)


def test_head_layout_from_the_wrong_config_key_is_caught(tiny_dirs: dict[str, Path]) -> None:
    # DeepSeek-V3's attention output is heads x v_head_dim, not heads x head_dim.
    lm = tiny(tiny_dirs, "deepseek_v3")
    family = family_of(lm.model)
    use_family(lm.model, replace(family, head_dim_key="head_dim"))
    try:
        results = doctor.run_doctor(lm, family.thinking)
    finally:
        use_family(lm.model, None)
    assert failed(results) == ["heads add up to the attention output", "attacks clean up after an exception"]
    assert "scale_heads" in [r.detail for r in results if not r.passed][1]


def test_an_attack_that_leaves_a_hook_behind_is_caught(tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, "qwen3")

    class Leaky:
        def __enter__(self) -> None:
            find_decoder_layers(lm.model)[0].register_forward_hook(lambda *a: None)

        def __exit__(self, *exc: object) -> None:
            return None

    attacks = {**doctor.attack_contexts(lm), "leaky": lambda m, d: Leaky()}
    try:
        results = doctor.run_doctor(lm, family_of(lm.model).thinking, attacks=attacks)
        assert failed(results) == ["attacks clean up after an exception"]
        assert [r.detail for r in results if not r.passed] == ["leaky"]
    finally:
        find_decoder_layers(lm.model)[0]._forward_hooks.clear()


def test_an_engine_reading_the_wrong_layer_is_caught(tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny(tiny_dirs, "llama")
    real = doctor.probe_traces

    def off_by_one(lm_, probe, *args, **kwargs):
        shifted = replace(probe, meta=replace(probe.meta, layer=probe.layer + 1))
        return real(lm_, shifted, *args, **kwargs)

    monkeypatch.setattr(doctor, "probe_traces", off_by_one)
    assert failed(doctor.run_doctor(lm, family_of(lm.model).thinking)) == ["engine trace = output_hidden_states"]


def test_a_format_that_is_not_the_models_is_caught(tiny_dirs: dict[str, Path]) -> None:
    # <think> markers on gpt-oss, whose template writes reasoning in the harmony analysis channel.
    lm = tiny(tiny_dirs, "gpt_oss")
    assert failed(doctor.run_doctor(lm, ThinkingFormat())) == ["target round-trips"]
    # Qwen3 with a close marker its template never writes.
    lm = tiny(tiny_dirs, "qwen3")
    assert "target round-trips" in failed(doctor.run_doctor(lm, ThinkingFormat(close_marker="</reasoning>")))


def test_the_doctor_reports_an_adapter_that_does_not_fit_instead_of_crashing(tiny_dirs: dict[str, Path],
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = doctor_json(capsys, "--model", tiny_dirs["phi3"], "--adapter", '{"attention_output": "dense"}')
    assert code == 1
    bad = {c["name"]: c["detail"] for c in doc["checks"] if not c["passed"]}
    assert "no Linear 'dense' in Phi3Attention" in bad["orthogonalisation"]
    assert "'self_attn.dense'" in bad["attention heads"]
    assert main(["doctor", "--model", str(tiny_dirs["phi3"]), "--adapter", '{"experts_x": 1}']) == 2
    assert "experts_x" in capsys.readouterr().err


def test_an_unknown_architecture_is_refused_with_the_supported_families(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'gpt2'.*qwen3_moe.*probes/families.py"):
        find_decoder_layers(model)
    with pytest.raises(UnsupportedModelError):
        with ablate_direction(model, torch.randn(32)):
            pass


def test_family_formats_are_read_from_the_model_directory(tiny_dirs: dict[str, Path]) -> None:
    assert family_for_dir(tiny_dirs["gpt_oss"]).thinking == HARMONY
    assert family_for_dir(tiny_dirs["qwen3"]).thinking.template_kwargs == {"enable_thinking": True}
    text = build_completion("weigh the request", "a safe answer", HARMONY)
    assert text == "weigh the request<|end|><|start|>assistant<|channel|>final<|message|>a safe answer"
    split = split_completion(text + "<|return|>", HARMONY, tiny(tiny_dirs, "gpt_oss").end_tokens)
    assert (split.reasoning, split.answer, split.closed) == ("weigh the request", "a safe answer", True)


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_end_tokens_are_read_from_the_checkpoint_and_stripped_from_every_familys_answer(name: str,
                                                                                        tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, name)
    fmt = family_of(lm.model).thinking
    ends = lm.end_tokens
    assert lm.tokenizer.eos_token in ends and fmt.close_marker not in ends
    # A completion as the model writes it: reasoning, close, answer, its end-of-turn token, then a
    # batch's padding. The split gives back exactly the reasoning and the answer.
    for end in ends:
        written = build_completion("weigh the request", "a safe answer", fmt) + end + (lm.tokenizer.pad_token or "")
        split = split_completion(written, fmt, ends)
        assert (split.reasoning, split.answer, split.closed) == ("weigh the request", "a safe answer", True), end
    # Reasoning cut by an end token before it closed is unclosed and ends there.
    assert split_completion("weigh the" + ends[0], fmt, ends).reasoning == "weigh the"


def test_gpt_oss_end_tokens_come_from_its_generation_config(tiny_dirs: dict[str, Path]) -> None:
    ends = tiny(tiny_dirs, "gpt_oss").end_tokens
    assert {"<|return|>", "<|call|>", "<|endoftext|>"} <= set(ends) and "<|end|>" not in ends


def test_a_template_that_closes_thinking_in_the_generation_prompt_is_caught_and_the_fix_named(
        tiny_dirs: dict[str, Path]) -> None:
    # DeepSeek-V3.1's template opens thinking only with thinking=True; the family declares it.
    lm = tiny(tiny_dirs, "deepseek_v3")
    fmt = family_of(lm.model).thinking
    assert fmt.template_kwargs == {"thinking": True}
    from probes.chat import render_generation_prompt

    assert render_generation_prompt(lm.tokenizer, "a question?", fmt).endswith("<｜Assistant｜><think>")
    without = replace(fmt, template_kwargs={})
    with pytest.raises(ValueError, match="closes the thinking block"):
        render_generation_prompt(lm.tokenizer, "a question?", without)
    results = doctor.run_doctor(lm, without)
    assert failed(results) == ["generation prompt opens thinking"]
    assert '{"thinking": true}' in next(r.detail for r in results if not r.passed)


@torch.no_grad()
def test_deepseek_dense_layers_stay_dense_and_masking_reroutes(tiny_dirs: dict[str, Path]) -> None:
    lm = tiny(tiny_dirs, "deepseek_v3")
    layers = find_moe_layers(lm.model)
    assert [m.layer for m in layers] == [1, 2] and all(m.shared is not None for m in layers)
    ids = lm.tokenizer("how are you today, assistant?", return_tensors="pt").input_ids
    base = lm.model(ids).logits
    with scale_expert_routing(lm.model, {(1, e): 0.0 for e in range(4)}):
        masked = lm.model(ids).logits
    assert not torch.allclose(base, masked)
    with orthogonalized(lm.model, torch.ones(lm.model.config.hidden_size)):
        pass
    assert torch.equal(lm.model(ids).logits, base)


def test_sampling_is_seeded_recorded_and_greedy_by_default(tiny_dirs: dict[str, Path]) -> None:
    from probes.generate import generate
    from probes.models import Sampling

    lm = load_model(tiny_dirs["qwen3"])
    fmt = family_of(lm.model).thinking
    prompts = ["hello there", "what is rain?", "tell me about bridges"]
    assert lm.sampling.greedy
    greedy = [g.generated_ids for g in generate(lm, prompts, fmt, max_new_tokens=8, batch_size=2)]
    lm.sampling = Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=1)
    first = [g.generated_ids for g in generate(lm, prompts, fmt, max_new_tokens=8, batch_size=2)]
    again = [g.generated_ids for g in generate(lm, prompts, fmt, max_new_tokens=8, batch_size=2)]
    lm.sampling = Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=2)
    other = [g.generated_ids for g in generate(lm, prompts, fmt, max_new_tokens=8, batch_size=2)]
    assert first == again and first != other and first != greedy
    with pytest.raises(ValueError, match="--top-p"):
        Sampling(temperature=0.6, top_p=0.0)


@torch.no_grad()
def test_device_map_and_attention_implementation_load_the_same_model(tiny_dirs: dict[str, Path]) -> None:
    plain = load_model(tiny_dirs["llama"])
    mapped = load_model(tiny_dirs["llama"], device_map="cpu", attn_implementation="eager")
    assert mapped.model.config._attn_implementation == "eager"
    assert mapped.fingerprint == plain.fingerprint
    ids = plain.tokenizer("a short test sentence", return_tensors="pt").input_ids
    assert torch.allclose(plain.model(ids).logits, mapped.model(ids).logits, atol=1e-5)


def test_an_attack_that_leaves_a_weight_edited_is_caught(tiny_dirs: dict[str, Path]) -> None:
    lm = load_model(tiny_dirs["qwen3"])  # its own copy: this test edits a weight for good
    weight = lm.model.get_input_embeddings().weight

    class Sticky:
        def __enter__(self) -> None:
            with torch.no_grad():
                weight[3, 5] += 1e-3  # a tiny edit, never undone

        def __exit__(self, *exc: object) -> None:
            return None

    results = doctor.run_doctor(lm, family_of(lm.model).thinking, attacks={"sticky": lambda m, d: Sticky()})
    assert [r.detail for r in results if not r.passed] == ["sticky"]
