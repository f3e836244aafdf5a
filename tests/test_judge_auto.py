"""``--judge auto`` (the recipes' default): the strongest refusal judge whose weights are here."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.judges import parse_judge_spec, resolve_auto_judge


def _checkpoint(folder: Path, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_auto_is_relevance_without_classifier_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURATE_JUDGE_MODELS", raising=False)
    assert resolve_auto_judge() == "relevance"
    assert parse_judge_spec("auto") == ("relevance", None)
    monkeypatch.setenv("CURATE_JUDGE_MODELS", str(tmp_path))
    _checkpoint(tmp_path / "wildguard", weights=False)  # a config with no weights is not a judge that runs
    _checkpoint(tmp_path / "Llama-Guard-4-12B")  # reads harm, not refusals: never chosen for every stage
    assert resolve_auto_judge() == "relevance"


def test_auto_takes_the_strongest_refusal_classifier_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_JUDGE_MODELS", str(tmp_path))
    wildguard = _checkpoint(tmp_path / "wildguard")
    assert parse_judge_spec("auto") == ("wildguard", str(wildguard))
    qwen = _checkpoint(tmp_path / "Qwen3Guard-Gen-4B")
    assert parse_judge_spec("auto") == ("qwen3guard", str(qwen))
