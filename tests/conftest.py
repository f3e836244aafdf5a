"""Session fixtures: the test-size organism is built once and every stage reuses
it (and what the earlier stages made from it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from curation.experiments.demo import write_candidate_pool
from curation.pipeline.probe_job import ProbeTrainSettings, train_probe_for_model
from curation.pipeline.score import ScoreSettings, score_records
from curation.pipeline.sources import read_jsonl
from curation.pipeline.store import Store
from probes.chat import ThinkingFormat
from probes.models import LoadedModel, load_model
from probes.refusal import RefusalProbe
from training.organism.build import OrganismConfig, build_organism
from training.prompts import read_prompts
from training.retain import build_retain_set

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
FMT = ThinkingFormat()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["CURATE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("organism") / "dense"
    build_organism(out, OrganismConfig(size="test", seed=0))
    return out


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Behaviour is not asserted for the MoE organism here, only its architecture
    # and that every stage runs on it, so a short build suffices.
    out = tmp_path_factory.mktemp("organism") / "moe"
    build_organism(out, OrganismConfig(size="test", seed=0, moe=True, epochs=2))
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random-weight model of every supported family (about a second each)."""
    from tests.families.build import TINY_FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_family(name, root / name) for name in TINY_FAMILIES}


@pytest.fixture(scope="session")
def lm(organism_dir: Path) -> LoadedModel:
    return load_model(organism_dir)


@pytest.fixture(scope="session")
def trained_probe(lm: LoadedModel, organism_dir: Path):
    return train_probe_for_model(lm, read_prompts(organism_dir / "train_prompts.jsonl"), FMT, ProbeTrainSettings())


@pytest.fixture(scope="session")
def probe(trained_probe) -> RefusalProbe:
    return trained_probe[0]


@pytest.fixture(scope="session")
def candidates(organism_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "candidates.jsonl"
    write_candidate_pool(organism_dir, path, seed=0, fmt=FMT)
    return path


@pytest.fixture(scope="session")
def scored_db(lm: LoadedModel, probe: RefusalProbe, candidates: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("store") / "curate.duckdb"
    with Store(db) as store:
        score_records(lm, probe, store, read_jsonl(candidates).records, FMT, ScoreSettings(judge_answers=True))
    return db


@pytest.fixture(scope="session")
def cliff_slice(scored_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cliff 1.7% selection of the session's scored pool, exported once (tests only read it)."""
    from curation.pipeline.select import export_selection

    sel = tmp_path_factory.mktemp("slice") / "sel.jsonl"
    with Store(scored_db, read_only=True) as store:
        export_selection(store, sel, strategy="cliff", budget_text="1.7%", fmt=FMT)
    return sel


@pytest.fixture(scope="session")
def retain_file(lm: LoadedModel, organism_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retain") / "retain.jsonl"
    harmless = [p for p in read_prompts(organism_dir / "train_prompts.jsonl") if not p.harmful][:48]
    build_retain_set(lm, harmless, path, FMT)
    return path
