"""Probe training and storage, hooks, and thinking-span handling on real tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from probes.capture import StopForward, capture_residual, find_decoder_layers, stop_after_layer
from probes.chat import ThinkingFormat, marker_end_index, render_generation_prompt, split_completion
from probes.models import LoadedModel, load_model
from probes.probe_fit import sweep_layers
from probes.refusal import PROBE_META, PROBE_WEIGHTS, ProbeMismatchError, RefusalProbe

from .conftest import FMT

# --- probe training and files ---------------------------------------------------


def test_train_probe_picks_the_informative_layer() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 60)
    noise = rng.normal(size=(120, 16))
    signal = noise.copy()
    signal[:, 3] += 4.0 * (y - 0.5)
    probe = sweep_layers({0: noise, 1: signal}, y, model_fingerprint="fp").choose()
    by_layer = {r.layer: r for r in probe.meta.sweep}
    assert probe.layer == 1
    assert by_layer[1].heldout_auroc > 0.95 > by_layer[0].heldout_auroc
    scores = probe.scores(torch.tensor(signal, dtype=torch.float32)).numpy()
    assert ((scores > 0.5) == y).mean() > 0.9


def test_probe_on_organism_separates_refusal_from_compliance(trained_probe) -> None:
    probe, report = trained_probe
    assert report.n_positive >= 50 and report.n_negative >= 50
    best = max(r.heldout_auroc for r in probe.meta.sweep)
    assert best >= 0.95
    assert probe.layer in {r.layer for r in probe.meta.sweep}


def test_probe_roundtrip_is_safetensors_and_json(probe: RefusalProbe, tmp_path: Path) -> None:
    probe.save(tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == sorted([PROBE_WEIGHTS, PROBE_META])
    loaded = RefusalProbe.load(tmp_path / "p")
    assert torch.equal(loaded.weight, probe.weight) and loaded.bias == probe.bias
    assert loaded.meta == probe.meta
    meta = json.loads((tmp_path / "p" / PROBE_META).read_text())
    assert meta["layer"] == probe.layer and meta["sweep"]
    # What the labels rest on: the traces' budget and decoding travel with the probe.
    assert meta["generation"]["max_new_tokens"] > 0 and meta["generation"]["sampling"]["temperature"] == 0.0


def test_probe_refuses_another_model(probe: RefusalProbe, lm: LoadedModel, moe_dir: Path) -> None:
    probe.check_model(lm.fingerprint, lm.model.config.hidden_size)
    moe = load_model(moe_dir)
    with pytest.raises(ProbeMismatchError, match="trained on model"):
        probe.check_model(moe.fingerprint, moe.model.config.hidden_size)
    with pytest.raises(ProbeMismatchError, match="hidden size"):
        probe.check_model(lm.fingerprint, 7)


def test_probe_refuses_to_load_for_another_model(probe: RefusalProbe, lm: LoadedModel, moe_dir: Path, tmp_path: Path) -> None:
    probe.save(tmp_path / "p")
    assert RefusalProbe.load_for(tmp_path / "p", lm).probe_id == probe.probe_id
    with pytest.raises(ProbeMismatchError, match="curate probe train"):
        RefusalProbe.load_for(tmp_path / "p", load_model(moe_dir))


# --- hooks ------------------------------------------------------------------------


def test_hooks_capture_and_always_remove_themselves(lm: LoadedModel, moe_dir: Path) -> None:
    ids = torch.tensor([lm.tokenizer.encode("hello there", add_special_tokens=False)])
    layers = find_decoder_layers(lm.model)
    with capture_residual(lm.model, [0, -1]) as captured:
        lm.model(input_ids=ids)
    assert set(captured) == {0, len(layers) - 1}
    assert captured[0].shape == (1, ids.shape[1], lm.model.config.hidden_size)
    with pytest.raises(RuntimeError):
        with capture_residual(lm.model, [0]):
            raise RuntimeError("boom")
    with stop_after_layer(lm.model, 0), pytest.raises(StopForward):
        lm.model(input_ids=ids)
    assert all(not layer._forward_hooks for layer in layers)
    moe = load_model(moe_dir)
    assert len(find_decoder_layers(moe.model)) == moe.model.config.num_hidden_layers


def test_layers_found_through_a_peft_wrapper(lm: LoadedModel) -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(load_model(lm.path).model, LoraConfig(r=2, target_modules="all-linear"))
    assert len(find_decoder_layers(wrapped)) == len(find_decoder_layers(lm.model))


# --- thinking spans ------------------------------------------------------------------


def test_split_completion_variants() -> None:
    fmt = ThinkingFormat()
    assert split_completion("harm named.\n</think>\n\nNo.", fmt).answer == "No."
    reemitted = split_completion("<think>\nreason</think>ok", fmt)
    assert (reemitted.reasoning, reemitted.answer, reemitted.closed) == ("reason", "ok", True)
    capped = split_completion("still thinking and thinking", fmt)
    assert capped.closed is False and capped.answer == ""
    custom = ThinkingFormat(open_marker="[REASON]", close_marker="[/REASON]")
    assert split_completion("[REASON] a [/REASON] b", custom).answer == "b"
    with pytest.raises(ValueError):
        ThinkingFormat(open_marker="x", close_marker="x")


def test_generation_prompt_opens_thinking_whether_or_not_the_template_does(lm: LoadedModel, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(lm.path)
    # A Qwen3-style template that does not open the block: the marker is appended.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = render_generation_prompt(tok, "hi", FMT)
    assert text.endswith("<|im_start|>assistant\n<think>\n") and text.count("<think>") == 1
    # The organism's template opens it already: not doubled.
    assert render_generation_prompt(lm.tokenizer, "hi", FMT).count("<think>") == 1
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_generation_prompt(tok, "hi", FMT)


def test_marker_index_for_single_and_multi_token_markers(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    ids = tok.encode("a reason\n</think>\n\nok", add_special_tokens=False)
    idx = marker_end_index(ids, tok, "</think>")
    assert idx is not None and tok.decode(ids[idx : idx + 1]) == "</think>"
    # A marker made of ordinary text spans several tokens.
    ids = tok.encode("we reason here END-OF-THOUGHT and answer", add_special_tokens=False)
    idx = marker_end_index(ids, tok, "END-OF-THOUGHT")
    assert idx is not None
    assert tok.decode(ids[: idx + 1]).endswith("END-OF-THOUGHT")
    assert "END-OF-THOUGHT" not in tok.decode(ids[:idx])
    assert marker_end_index(ids, tok, "</think>") is None
