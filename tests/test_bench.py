"""The benchmark's correctness, not its timings (those are printed by
`curate bench`, never asserted): both sides score alike, and a disagreement
is caught."""

from __future__ import annotations

from pathlib import Path

from curation.experiments.bench import compare, run_scoring_bench, run_select_bench
from probes.refusal import RefusalProbe


def test_engine_and_naive_baseline_agree(organism_dir: Path, probe: RefusalProbe, tmp_path: Path) -> None:
    probe.save(tmp_path / "probe")
    result = run_scoring_bench(str(organism_dir), str(tmp_path / "probe"), str(organism_dir / "train_prompts.jsonl"),
                               n=6, max_new_tokens=48, batch_size=4, device="cpu", dtype="float32", tolerance=1e-3)
    assert result["full_agreement"]["agree"], result["full_agreement"]
    assert result["rescoring_agreement"]["agree"] and result["rescoring_agreement"]["n_identical_reasoning"] == 6
    for part in ("full_scoring", "rescoring"):
        for side in ("engine", "baseline"):
            assert result[part][side]["tokens_per_s"] > 0 and result[part][side]["peak_rss_mb"] > 0
        assert result[part]["ratio_engine_over_baseline"]["tokens_per_s"] > 0


def test_compare_flags_disagreement() -> None:
    side = {"n": 2, "sequences": [[1, 2], [3]], "traces": [[0.1, 0.2], [0.3]]}
    other = {"n": 2, "sequences": [[1, 2], [3]], "traces": [[0.1, 0.2], [0.9]]}
    assert compare(side, side, 1e-6)["agree"]
    assert not compare(side, other, 1e-3)["agree"]
    diverged = {"n": 2, "sequences": [[1, 2], [4]], "traces": [[0.1, 0.2], [0.3]]}
    assert not compare(side, diverged, 1e-3)["agree"]  # too few identical reasoning traces to vouch for


def test_select_bench_counts() -> None:
    result = run_select_bench(20_000, "1.7%")
    assert result["n_selected"] == 340 and result["select_seconds"] > 0
