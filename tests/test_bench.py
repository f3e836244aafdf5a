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


def test_store_bench_fills_the_traces_it_claims(tmp_path: Path) -> None:
    from curation.experiments.bench import run_store_bench

    result = run_store_bench(3_000, trace_tokens=50, directory=str(tmp_path))
    assert result["n_selected"] == 51 and result["bytes_per_row"] > 50 * 0.5  # the traces are really stored
    from curation.pipeline.store import Store

    with Store(tmp_path / "peek.duckdb") as store:
        store.fill_synthetic(10, trace_tokens=50, reasoning_chars=200)
        lengths = store.con.execute("SELECT min(len(trace)), max(len(trace)), min(length(reasoning)) FROM scores").fetchone()
    assert lengths == (50, 50, 200)


def test_reprobe_bench_reads_stored_generations(organism_dir: Path, probe: RefusalProbe, tmp_path: Path) -> None:
    from curation.experiments.reprobe_bench import bench_model

    probe.save(tmp_path / "probe")
    prompts = [f"Tell me about topic number {i}." for i in range(4)]
    result = bench_model(organism_dir, prompts, tmp_path / "probe", max_new_tokens=16, batch_size=2)
    assert result["full_scoring_generations"] == 4 and result["reprobe_generations"] == 0
    assert all(v > 0 for v in result["seconds"].values()) and result["ratios"]["reprobe_speedup"] > 0
