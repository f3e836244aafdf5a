"""``curate bench --generator vllm``: in one run, on the same prompts, output tokens/s of
in-process HF ``generate`` (batched as the project batches) and of a vLLM server; the probe
pass's cost as a share of each; and the token parity of the two generators' greedy outputs.

The HF side runs first, before the server starts, so neither side shares the CPU with the other;
each side is warmed up on a few prompts first so a first-call cost is not timed. The server is
one the bench starts from ``make engine``'s environment, or a running one (``--generator-url``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _tokens(gens: list[Any]) -> int:
    return sum(len(g.generated_ids) for g in gens)


def run_vllm_bench(model_dir: str, probe_dir: str, prompts_file: str, *, n: int, max_new_tokens: int, batch_size: int,
                   url: str | None, log_dir: Path, say=print) -> dict[str, Any]:
    from curation.pipeline.vllm_server import ServerSettings, served
    from probes.chat import ThinkingFormat
    from probes.forward import probe_traces
    from probes.generate import generate, reasoning_span
    from probes.models import load_model
    from probes.refusal import RefusalProbe
    from probes.remote_generate import RemoteGenerator
    from training.prompts import read_prompts

    fmt = ThinkingFormat()
    lm = load_model(model_dir, dtype="float32")  # fp32: the dtype whose greedy tokens the two generators share on CPU
    probe = RefusalProbe.load_for(probe_dir, lm)
    prompts = [p.prompt for p in read_prompts(prompts_file)][:n]
    close_ids = lm.tokenizer.encode(fmt.before_close + fmt.close_marker, add_special_tokens=False)

    def timed_generation() -> tuple[float, list[Any]]:
        generate(lm, prompts[:batch_size], fmt, max_new_tokens=8, batch_size=batch_size)  # warm-up
        started = time.perf_counter()
        gens = generate(lm, prompts, fmt, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return time.perf_counter() - started, gens

    say(f"HF generate: {len(prompts)} prompts, batch {batch_size}")
    hf_s, hf = timed_generation()
    spans = [reasoning_span(g, close_ids, max_new_tokens) for g in hf]
    started = time.perf_counter()
    probe_traces(lm, probe, [s.sequence for s in spans], [s.span for s in spans], batch_size=batch_size)
    probe_s = time.perf_counter() - started

    def remote(base: str) -> tuple[float, list[Any]]:
        lm.generator = RemoteGenerator(base)
        try:
            return timed_generation()
        finally:
            lm.generator = None

    started = time.perf_counter()
    if url:
        say(f"vLLM: the server at {url}")
        vllm_s, vl = remote(url)
        startup_s = None
    else:
        say("vLLM: starting a server from the engine environment")
        with served(ServerSettings(model_dir=model_dir), log_dir / "vllm-bench-server.log") as base:
            startup_s = time.perf_counter() - started
            vllm_s, vl = remote(base)
    same = sum(a.generated_ids == b.generated_ids for a, b in zip(hf, vl, strict=True))
    hf_tok, vl_tok = _tokens(hf), _tokens(vl)
    return {
        "n": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": "float32",
        "hf": {"seconds": hf_s, "output_tokens": hf_tok, "tokens_per_s": hf_tok / hf_s},
        "vllm": {"seconds": vllm_s, "output_tokens": vl_tok, "tokens_per_s": vl_tok / vllm_s, "server_startup_s": startup_s,
                 "url": url or "started by the bench"},
        "ratio_vllm_over_hf_tokens_per_s": (vl_tok / vllm_s) / (hf_tok / hf_s),
        "probe_pass": {"seconds": probe_s, "share_of_hf_generation": probe_s / hf_s, "share_of_vllm_generation": probe_s / vllm_s},
        "parity": {"identical": same, "n": len(prompts), "share": same / len(prompts)},
    }


def print_vllm_bench(r: dict[str, Any], console: Console) -> None:
    """The bench's table and the lines under it."""
    table = Table(title=f"generation: {r['n']} prompts, up to {r['max_new_tokens']} new tokens, {r['dtype']}, same prompts both sides")
    for col in ("generator", "seconds", "output tokens", "output tokens/s"):
        table.add_column(col, justify="right")
    for name, key in ((f"HF generate (batch {r['batch_size']})", "hf"), ("vLLM server", "vllm")):
        side = r[key]
        table.add_row(name, f"{side['seconds']:.2f}", f"{side['output_tokens']:,}", f"{side['tokens_per_s']:,.0f}")
    table.add_row("vLLM / HF", "", "", f"{r['ratio_vllm_over_hf_tokens_per_s']:.2f}x")
    console.print(table)
    probe, parity = r["probe_pass"], r["parity"]
    console.print(f"probe pass (teacher-forced, in-process): {probe['seconds']:.2f} s = {100 * probe['share_of_hf_generation']:.0f}% "
                  f"of HF generation, {100 * probe['share_of_vllm_generation']:.0f}% of vLLM generation", highlight=False)
    console.print(f"greedy parity: {parity['identical']}/{parity['n']} outputs token-for-token identical", highlight=False)
    if r["vllm"]["server_startup_s"] is not None:
        console.print(f"server start-up (not timed above): {r['vllm']['server_startup_s']:.0f} s", highlight=False)
