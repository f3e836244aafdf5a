"""Refusal-suppression heads: the attribution adds up, ablation is exact and
leaves no hooks behind, and the sweep reports top against random heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from curation.experiments.heads import HeadsSettings, export_scaled_model, run_heads
from probes.capture import attention_head_layout, find_attention_output, find_decoder_layers
from probes.heads import head_contributions, rank_heads, scale_heads
from probes.models import LoadedModel, load_model
from probes.refusal import RefusalProbe
from training.prompts import read_prompts

from .conftest import FMT


def _sequences(lm: LoadedModel) -> list[list[int]]:
    texts = ["How to pick a lock?", "Why is the sky blue?", "Can you share your email address?"]
    return [lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_head_scores_add_up_to_the_attention_output_projection(lm: LoadedModel, probe: RefusalProbe) -> None:
    seqs = _sequences(lm)
    positions = [len(s) - 1 for s in seqs]
    scores = head_contributions(lm, probe, seqs, positions)
    w = probe.weight / probe.weight.norm()
    outputs: list[torch.Tensor] = []
    for layer in range(scores.shape[0]):
        proj = find_attention_output(lm.model, layer)
        handle = proj.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
        try:
            expected = 0.0
            for seq, pos in zip(seqs, positions, strict=True):
                outputs.clear()
                lm.model(input_ids=torch.tensor([seq]))
                expected += float(outputs[0][0, pos] @ w)
        finally:
            handle.remove()
        assert scores[layer].sum() == pytest.approx(expected / len(seqs), rel=1e-4, abs=1e-5)
    ranking = rank_heads(scores)
    assert scores[ranking[0]] == scores.min() and len(ranking) == scores.size


def test_scale_heads_identity_zero_and_cleanup(lm: LoadedModel) -> None:
    ids = torch.tensor([_sequences(lm)[0]])
    n_heads, _ = attention_head_layout(lm.model)
    base = lm.model(input_ids=ids).logits
    with scale_heads(lm.model, [(0, h) for h in range(n_heads)], gamma=1.0):
        assert torch.allclose(lm.model(input_ids=ids).logits, base, atol=1e-6)
    with scale_heads(lm.model, [(0, h) for h in range(n_heads)], gamma=0.0):
        changed = lm.model(input_ids=ids).logits
    assert not torch.allclose(changed, base)
    with pytest.raises(RuntimeError), scale_heads(lm.model, [(0, 0)]):
        raise RuntimeError("boom")
    assert torch.allclose(lm.model(input_ids=ids).logits, base, atol=1e-6)
    assert all(not find_attention_output(lm.model, i)._forward_hooks for i in range(len(find_decoder_layers(lm.model))))
    with pytest.raises(ValueError, match="out of range"), scale_heads(lm.model, [(0, n_heads)]):
        pass


def test_exported_weights_match_the_context_manager(lm: LoadedModel, organism_dir: Path, tmp_path: Path) -> None:
    heads = [(0, 1), (1, 2)]
    ids = torch.tensor([_sequences(lm)[1]])
    with scale_heads(lm.model, heads, gamma=0.25):
        hooked = lm.model(input_ids=ids).logits
    exported = load_model(export_scaled_model(organism_dir, heads, 0.25, tmp_path / "scaled"))
    assert torch.allclose(exported.model(input_ids=ids).logits, hooked, atol=1e-5)
    assert json.loads((tmp_path / "scaled" / "scaled_heads.json").read_text())["gamma"] == 0.25


def test_heads_sweep_reports_top_and_random(lm: LoadedModel, probe: RefusalProbe, organism_dir: Path, tmp_path: Path) -> None:
    attribution = read_prompts(organism_dir / "train_prompts.jsonl")[:120]
    evaluation = read_prompts(organism_dir / "heldout_prompts.jsonl")
    doc = run_heads(lm, probe, attribution, evaluation, FMT, HeadsSettings(ks=(12.5, 25.0)), tmp_path / "heads")
    contributions = np.array(doc["contributions"])
    n_heads, _ = attention_head_layout(lm.model)
    assert contributions.shape == (probe.layer + 1, n_heads) and doc["n_traces"] > 0
    assert [r["n_heads"] for r in doc["sweep"]] == [1, 2]  # of 2 layers x 4 heads
    for row in doc["sweep"]:
        assert 0.0 <= row["top_asr"] <= 1.0 and 0.0 <= row["random_asr"] <= 1.0
        assert row["top_heads"] == [list(h) for h in doc["ranking"][: row["n_heads"]]] or \
            row["top_heads"] == [tuple(h) for h in doc["ranking"][: row["n_heads"]]]
    assert (tmp_path / "heads" / "heads.html").exists()
    saved = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert saved["bias_included"] is False and saved["sweep"][0]["k_percent"] == 12.5
