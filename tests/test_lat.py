"""Latent adversarial training (``finetune --robust --robust-method lat``): the PGD perturbation stays
in its bound and raises the refusal loss it is trained against, only the slice's harmful rows are
perturbed, every hook is gone after training, and the saved adapter loads and runs without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from probes.models import LoadedModel, load_model
from training.finetune import FinetuneConfig, finetune_lora
from training.lat import LatConfig, project
from training.robust import RobustConfig, hook_count

from .conftest import FMT


def test_the_projection_keeps_every_token_inside_its_ball() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g) * torch.rand(3, 7, 1, generator=g) * 5
    delta = torch.randn(3, 7, 16, generator=g) * 10
    out = project(delta, hidden, 0.5)
    ratio = out.norm(dim=-1) / hidden.norm(dim=-1)
    assert float(ratio.max()) <= 0.5 + 1e-5
    small = delta * 1e-4  # already inside: unchanged
    assert torch.allclose(project(small, hidden, 0.5), small)
    with pytest.raises(ValueError, match="--lat-epsilon"):
        LatConfig(epsilon=0)
    with pytest.raises(ValueError, match="--robust-method"):
        RobustConfig(method="pgd")


def test_lat_finetune_respects_its_bound_and_leaves_a_plain_adapter(
    lm: LoadedModel, cliff_slice: Path, organism_dir: Path, retain_file: Path, tmp_path: Path
) -> None:
    sel = cliff_slice
    cfg = FinetuneConfig(epochs=2, robust=RobustConfig(p=1.0, method="lat", lat_epsilon=0.3, lat_steps=3))
    summary = finetune_lora(organism_dir, sel, tmp_path / "lat", cfg, FMT, retain_file=retain_file)
    info = summary["robust"]["lat"]
    assert info["attacked"] > 0 and info["harmful_rows"] > 0 and info["hooks_left"] == 0
    assert 0 < info["max_relative_norm"] <= 0.3 + 1e-4
    # The ascent found a perturbation that hurts the refusal targets: on average the loss under it is
    # above the clean loss of the same step (same weights).
    gaps = [a - c for a, c in zip(info["loss_attacked"], info["loss_clean"], strict=True)]
    assert sum(gaps) / len(gaps) > 0
    saved = json.loads((tmp_path / "lat" / "finetune.json").read_text())
    assert saved["robust"]["config"]["method"] == "lat" and saved["robust"]["config"]["lat_epsilon"] == 0.3
    card = (tmp_path / "lat" / "README.md").read_text()
    assert "latent adversarial training" in card
    tuned = load_model(organism_dir, adapter=tmp_path / "lat")
    assert hook_count(tuned.model) == 0
    ids = tuned.tokenizer("a question?", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(tuned.model(**ids.to(tuned.device)).logits).all()
