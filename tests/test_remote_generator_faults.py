"""``--generator vllm`` when the server misbehaves: unreachable, serving another model or another
tokenizer, refusing one prompt, cutting a prompt at its ``max_model_len``, dying mid-run. A small
HTTP server in the test stands in for vLLM's API (the real server is tested in
test_vllm_engine.py); its completions are the local model's own greedy tokens, so what is stored
can be checked against an in-process run."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest

from curation.cli.main import main
from probes.chat import ThinkingFormat
from probes.generate import generate
from probes.models import LoadedModel
from probes.refusal import RefusalProbe
from probes.remote_generate import GeneratorRowError, GeneratorUnavailable, RemoteGenerator

FMT = ThinkingFormat()


class FakeVLLM:
    """/v1/models, /tokenize and /v1/completions, answering from ``answers`` (prompt ids -> ids)."""

    def __init__(self, tokenizer: Any, answers: dict[tuple[int, ...], list[int]], *, name: str = "curate-model",
                 max_model_len: int = 512, die_after: int | None = None, tokenizer_shift: int = 0,
                 refuse_prompt: tuple[int, ...] | None = None) -> None:
        self.tokenizer, self.answers, self.name, self.max_model_len = tokenizer, answers, name, max_model_len
        self.die_after, self.tokenizer_shift, self.refuse_prompt = die_after, tokenizer_shift, refuse_prompt
        self.completions = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": fake.name, "max_model_len": fake.max_model_len}]})
                else:
                    self._send(404, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = fake.tokenizer.encode(body["prompt"], add_special_tokens=False)
                    self._send(200, {"tokens": [t + fake.tokenizer_shift for t in ids]})
                    return
                fake.completions += 1
                if fake.die_after is not None and fake.completions > fake.die_after:
                    self.connection.close()  # the server went away mid-request
                    return
                prompt = tuple(body["prompt"])
                if prompt == fake.refuse_prompt:
                    self._send(400, {"error": {"message": "this prompt is refused"}})
                    return
                ids = fake.answers[prompt][: body["max_tokens"]]
                self._send(200, {"choices": [{"text": "", "token_ids": ids, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _answers(lm: LoadedModel, prompts: list[str], max_new_tokens: int, stop_at_close: bool = True) -> dict:
    made = generate(lm, prompts, FMT, max_new_tokens=max_new_tokens, batch_size=32, stop_at_close=stop_at_close)
    return {tuple(g.prompt_ids): g.generated_ids for g in made}


@pytest.fixture
def pool(candidates: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    lines = candidates.read_text().splitlines()[:16]
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, [json.loads(line)["prompt"] for line in lines]


def test_an_unreachable_server_is_an_error_not_a_quarantine(capsys, organism_dir: Path, probe: RefusalProbe, pool,
                                                            tmp_path: Path) -> None:
    data, _ = pool
    fake = FakeVLLM(None, {})
    url = fake.url
    fake.close()  # nothing listens there any more
    db = tmp_path / "s.duckdb"
    code = main(["score", "--model", str(organism_dir), "--probe", str(probe.save(tmp_path / "p")), "--data", str(data),
                 "--db", str(db), "--generator", "vllm", "--generator-url", url])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "did not answer" in err and url in err
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)


def test_a_server_with_another_model_or_tokenizer_is_refused(lm: LoadedModel) -> None:
    other = FakeVLLM(lm.tokenizer, {}, name="someone-else")
    shifted = FakeVLLM(lm.tokenizer, {}, tokenizer_shift=1)
    try:
        with pytest.raises(GeneratorUnavailable, match="does not serve 'curate-model'"):
            RemoteGenerator(other.url, model="curate-model").check(lm.tokenizer, lm.fingerprint)
        with pytest.raises(GeneratorUnavailable, match="tokenizes differently"):
            RemoteGenerator(shifted.url).check(lm.tokenizer, lm.fingerprint)
    finally:
        other.close()
        shifted.close()


def test_a_refused_prompt_and_a_prompt_over_max_model_len_are_quarantined_with_the_reason(
        capsys, lm: LoadedModel, organism_dir: Path, probe: RefusalProbe, pool, tmp_path: Path) -> None:
    data, prompts = pool
    answers = _answers(lm, prompts, 48)
    refused = next(iter(answers))
    fake = FakeVLLM(lm.tokenizer, answers, refuse_prompt=refused)
    try:
        db = tmp_path / "s.duckdb"
        code = main(["score", "--model", str(organism_dir), "--probe", str(probe.save(tmp_path / "p")), "--data", str(data),
                     "--db", str(db), "--max-new-tokens", "48", "--chunk-size", "8", "--generator", "vllm",
                     "--generator-url", fake.url, "--json"])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and summary["n_quarantined"] >= 1 and summary["n_scored"] == 16 - summary["n_quarantined"]
        with duckdb.connect(str(db), read_only=True) as con:
            reasons = [r[0] for r in con.execute("SELECT reason FROM quarantine").fetchall()]
            stored = con.execute("SELECT generated_ids FROM generations").fetchall()
        assert any("refused /v1/completions (400)" in r for r in reasons)
        assert all(list(ids) in answers.values() for (ids,) in stored)  # what was stored is what the server sent
    finally:
        fake.close()
    small = FakeVLLM(lm.tokenizer, answers, max_model_len=40)
    try:
        made = RemoteGenerator(small.url)
        made.check(lm.tokenizer, lm.fingerprint)
        done = made.complete([list(p) for p in answers], max_tokens=48, stop_token_ids=[], sampling=lm.sampling)
        assert all(isinstance(d, GeneratorRowError) and "max_model_len 40" in str(d) for d in done)
    finally:
        small.close()


def test_a_server_that_dies_mid_run_stops_the_run_and_a_rerun_resumes(
        capsys, lm: LoadedModel, organism_dir: Path, probe: RefusalProbe, pool, tmp_path: Path) -> None:
    data, prompts = pool
    answers = _answers(lm, prompts, 48)
    fake = FakeVLLM(lm.tokenizer, answers, die_after=8)  # the first chunk of 8 gets through
    probe_dir = probe.save(tmp_path / "p")
    db = tmp_path / "s.duckdb"
    args = ["score", "--model", str(organism_dir), "--probe", str(probe_dir), "--data", str(data), "--db", str(db),
            "--max-new-tokens", "48", "--chunk-size", "8"]
    try:
        code = main([*args, "--generator", "vllm", "--generator-url", fake.url])
        err = " ".join(capsys.readouterr().err.split())
        assert code != 0 and "did not answer" in err
    finally:
        fake.close()
    with duckdb.connect(str(db), read_only=True) as con:
        kept = con.execute("SELECT count(*) FROM scores").fetchone()[0]
        assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)  # no row was blamed for the server
        assert con.execute("SELECT status FROM runs").fetchall() == [("failed",)]
    assert kept == 8
    assert main([*args, "--json"]) == 0  # the rerun (in-process) scores only what is missing
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_already_scored"] == 8 and summary["n_scored"] == 8
