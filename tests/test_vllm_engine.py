"""``--generator vllm`` against a real vLLM server (the CPU build, ``make engine``) on the organism:
token parity with in-process generation, a score run that fills the store and exports the same
reasoning as ``--generator hf``, and a server the run starts and stops itself. Skipped, with the
reason, only where the engine environment could not be installed."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from curation.cli.main import main
from curation.pipeline.vllm_server import ServerSettings, engine_python, served
from probes.chat import ThinkingFormat
from probes.generate import generate, remote_allowed
from probes.models import LoadedModel
from probes.refusal import RefusalProbe
from probes.remote_generate import RemoteGenerator


def _engine_missing() -> str | None:
    try:
        engine_python()
    except FileNotFoundError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_engine_missing() is not None, reason=f"vLLM engine tests skipped: {_engine_missing()}")
FMT = ThinkingFormat()


@pytest.fixture(scope="module")
def server(organism_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # LoRA enabled (runtime loading allowed): the fine-tuned models' tests load adapters into it.
    with served(ServerSettings(model_dir=str(organism_dir), lora_rank=8), log) as url:
        yield url


def _prompts(organism_dir: Path, n: int) -> list[str]:
    return [json.loads(line)["prompt"] for line in (organism_dir / "heldout_prompts.jsonl").read_text().splitlines()[:n]]


def test_greedy_fp32_matches_in_process_generation_token_for_token(lm: LoadedModel, organism_dir: Path, server: str) -> None:
    prompts = _prompts(organism_dir, 48)
    local = generate(lm, prompts, FMT, max_new_tokens=96, batch_size=48, stop_at_close=False)
    lm.generator = RemoteGenerator(server)
    try:
        assert remote_allowed(lm)
        remote = generate(lm, prompts, FMT, max_new_tokens=96, batch_size=48, stop_at_close=False)
        assert lm.generator.model == "curate-model" and lm.generator.max_model_len == 512
    finally:
        lm.generator = None
    same = sum(a.generated_ids == b.generated_ids for a, b in zip(local, remote, strict=True))
    assert same >= 0.95 * len(prompts), f"{same} of {len(prompts)} identical"
    assert [g.prompt_ids for g in local] == [g.prompt_ids for g in remote]  # the project rendered both
    assert all(g.close_index is not None for g in remote)


def test_a_steered_model_never_generates_on_the_server(lm: LoadedModel, server: str) -> None:
    lm.generator = RemoteGenerator(server)
    handle = lm.model.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert not remote_allowed(lm)  # the server cannot see the hook: generation stays in-process
    finally:
        handle.remove()
        lm.generator = None


def _score(capsys, organism_dir: Path, probe_dir: Path, data: Path, db: Path, *extra: str) -> dict:
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
                 "--max-new-tokens", "64", "--chunk-size", "8", "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _exported(capsys, db: Path, out: Path) -> dict[str, str]:
    assert main(["select", "--db", str(db), "--budget", "100%", "--out", str(out)]) == 0
    capsys.readouterr()
    return {r["id"]: r["reasoning"] for r in map(json.loads, out.read_text().splitlines())}


def test_score_through_vllm_fills_the_store_and_exports_what_hf_exports(
        capsys, organism_dir: Path, probe: RefusalProbe, candidates: Path, server: str, tmp_path: Path) -> None:
    probe_dir = probe.save(tmp_path / "probe")
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(candidates.read_text().splitlines()[:24]) + "\n")
    via_vllm = _score(capsys, organism_dir, probe_dir, data, tmp_path / "vllm.duckdb", "--generator", "vllm",
                      "--generator-url", server + "/v1")
    via_hf = _score(capsys, organism_dir, probe_dir, data, tmp_path / "hf.duckdb")
    assert via_vllm["n_scored"] == via_hf["n_scored"] == 24 and via_vllm["n_quarantined"] == 0
    with duckdb.connect(str(tmp_path / "vllm.duckdb"), read_only=True) as con:
        params = json.loads(con.execute("SELECT params FROM runs WHERE kind = 'score'").fetchone()[0])
        n_generations = con.execute("SELECT count(*) FROM generations").fetchone()[0]
    assert params["generator"]["generator"] == "vllm" and n_generations == 24
    a, b = _exported(capsys, tmp_path / "vllm.duckdb", tmp_path / "a.jsonl"), _exported(capsys, tmp_path / "hf.duckdb", tmp_path / "b.jsonl")
    assert a.keys() == b.keys() and sum(a[k] == b[k] for k in a) >= 0.95 * len(a)
    # Rows from either generator are interchangeable: an hf rerun into the vLLM store generates nothing.
    again = _score(capsys, organism_dir, probe_dir, data, tmp_path / "vllm.duckdb")
    assert again["n_generated"] == 0


def _api_servers() -> list[str]:
    """Command lines of the vLLM API servers running on this machine."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in args)
        if "vllm.entrypoints.openai.api_server" in text:
            found.append(text)
    return found


def test_a_run_starts_its_own_server_and_stops_it(capsys, organism_dir: Path, probe: RefusalProbe, candidates: Path,
                                                  server: str, tmp_path: Path) -> None:
    probe_dir = probe.save(tmp_path / "probe")
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(candidates.read_text().splitlines()[:8]) + "\n")
    before = _api_servers()
    summary = _score(capsys, organism_dir, probe_dir, data, tmp_path / "s.duckdb", "--generator", "vllm")
    assert summary["n_scored"] == 8 and summary["n_generated"] == 8
    log = (tmp_path / "vllm-server.log").read_text(errors="replace")
    assert log.strip()  # the server's own log, next to the store, for when it fails
    # The run's server is gone; the module's (started before it) is untouched.
    assert _api_servers() == before and any(f"--port {server.rsplit(':', 1)[1]}" in c for c in before)


@pytest.fixture(scope="module")
def adapter(organism_dir: Path, cliff_slice: Path, retain_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.finetune import FinetuneConfig, finetune_lora

    out = tmp_path_factory.mktemp("lora") / "adapter"
    finetune_lora(organism_dir, cliff_slice, out, FinetuneConfig(epochs=2), FMT, retain_file=retain_file)
    return out


def test_a_fine_tuned_model_generates_on_the_server_with_its_adapter(organism_dir: Path, adapter: Path, server: str) -> None:
    from probes.models import load_model

    tuned = load_model(organism_dir, adapter=adapter)
    prompts = _prompts(organism_dir, 48)
    local = generate(tuned, prompts, FMT, max_new_tokens=96, batch_size=48, stop_at_close=False)
    tuned.generator = RemoteGenerator(server)
    try:
        assert not remote_allowed(tuned)  # the server does not hold this adapter yet
        name = tuned.generator.load_adapter(adapter)
        assert remote_allowed(tuned) and tuned.generator.load_adapter(adapter) == name  # loaded once
        assert name in [m["id"] for m in tuned.generator._request("GET", "/v1/models")["data"]]
        remote = generate(tuned, prompts, FMT, max_new_tokens=96, batch_size=48, stop_at_close=False)
    finally:
        tuned.generator = None
    same = sum(a.generated_ids == b.generated_ids for a, b in zip(local, remote, strict=True))
    assert same >= 0.95 * len(prompts), f"{same} of {len(prompts)} identical"
    base = generate(load_model(organism_dir), prompts, FMT, max_new_tokens=96, batch_size=48, stop_at_close=False)
    assert sum(a.generated_ids != b.generated_ids for a, b in zip(base, remote, strict=True)) > 0  # the adapter acted


def test_an_adapter_the_server_cannot_load_is_refused_with_its_reason(organism_dir: Path, server: str,
                                                                      tmp_path: Path) -> None:
    from probes.remote_generate import AdapterUnavailable

    generator = RemoteGenerator(server)
    with pytest.raises(AdapterUnavailable, match="not a PEFT adapter folder"):
        generator.load_adapter(tmp_path)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA", "target_modules": ["q_proj"]}')
    (fake / "adapter_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(AdapterUnavailable, match="could not load the adapter"):
        generator.load_adapter(fake)
    assert not generator.serves(str(fake))


def test_the_attack_matrix_sends_its_unsteered_cells_to_the_server(organism_dir: Path, scored_db: Path, retain_file: Path,
                                                                   server: str, tmp_path: Path) -> None:
    from curation.experiments.attack_kit import KitSettings
    from curation.experiments.attacks import AttackExperiment, run_attack_experiment
    from probes.directions import DirectionSettings
    from training.evaluate import EvalSettings

    work = tmp_path / "work"
    work.mkdir()
    for name, target in (("organism", organism_dir), ("curate.duckdb", scored_db), ("retain.jsonl", retain_file)):
        (work / name).symlink_to(target)
    kit = KitSettings(n_extract=32, n_val=8, directions=DirectionSettings(n_positions=1, max_new_tokens=64),
                      actadd_coefficients=(1.0,), benign_coefficients=(2.0,), steer_layers=(1,), max_new_tokens=64)
    exp = AttackExperiment(workdirs={"dense": str(work)}, out=str(tmp_path / "attacks"), attacks=["none", "template", "ablate"],
                           rows=["base", "cliff 1.7%"], kit=kit, adaptive=(), budget=None, generator="vllm",
                           generator_url=server)
    exp.finetune.epochs = 2
    exp.eval_settings = EvalSettings(max_new_tokens=64, keep_samples=True)
    (org,) = run_attack_experiment(exp, FMT)["organisms"]
    by = {(c["row"], c["attack"]): c["generator"] for c in org["cells"]}
    # Unsteered cells of both rows (the fine-tune through its adapter) on the server; the steered one in-process.
    assert by == {(r, a): "hf" if a == "ablate" else "vllm" for r in exp.rows for a in exp.attacks}
    assert org["generators"]["cliff 1.7%"]["adapter"] and org["generators"]["base"]["generator"] == "vllm"
