"""``curate bench --reprobe``: what stored generations buy, measured in one run.

On each model, the same prompts, lengths and batches:

- **plain generate**: a batched ``generate`` of the prompts (the floor for scoring
  anything the model must write first);
- **full scoring**: ``score_records`` into an empty store (generation, the
  teacher-forced probe pass, the store writes);
- **re-probe**: ``score_records`` with a second probe into that store, reading
  the stored generations (teacher-forced pass and writes only);
- **bare forward**: one forward pass per batch of the same sequences, stopped at
  the probe layer (what the probe pass cannot beat), against the probe pass
  (``probe_traces``) over the same sequences and batches.

Ratios: re-probe speed-up over full scoring, full scoring over plain generate,
probe-pass throughput over bare-forward throughput. Two models: the demo
organism, and a random-weight model with a real model's shape where it costs:
Qwen3's 151,936-token vocabulary (the LM head that every generated token pays
for), tens of millions of parameters.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REALISTIC_VOCAB = 151_936  # Qwen3's vocabulary


def build_realistic_model(organism_dir: str | Path, out: str | Path) -> Path:
    """A random-weight Qwen3 with the real vocabulary size (embedding and LM head of a real
    model) and a small trunk, saved with the organism's tokenizer (its ids fit the vocabulary)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(organism_dir))
    config = Qwen3Config(vocab_size=REALISTIC_VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _random_probe(lm: Any, layer: int, seed: int) -> Any:
    import torch

    from probes.models import model_hidden_size
    from probes.refusal import ProbeMetadata, RefusalProbe, compute_probe_id

    weight = torch.randn(model_hidden_size(lm), generator=torch.Generator().manual_seed(seed)) / model_hidden_size(lm) ** 0.5
    meta = ProbeMetadata(layer=layer, hidden_size=weight.numel(), model_fingerprint=lm.fingerprint)
    meta.probe_id = compute_probe_id(weight, 0.0, layer, lm.fingerprint, meta.position)
    return RefusalProbe(weight, 0.0, meta)


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def bench_model(model_dir: str | Path, prompts: list[str], probe_dir: str | Path | None, *, max_new_tokens: int,
                batch_size: int) -> dict[str, Any]:
    """The timings and three ratios on one model (the first probe from ``probe_dir``, or a random one)."""
    import torch

    from curation.pipeline.score import ScoreSettings, score_records
    from curation.pipeline.sources import CandidateRecord, content_id
    from curation.pipeline.store import Store
    from probes.batching import pad_batch
    from probes.capture import StopForward, num_layers, stop_after_layer
    from probes.chat import ThinkingFormat
    from probes.forward import probe_traces
    from probes.generate import generate, reasoning_span
    from probes.models import load_model
    from probes.refusal import RefusalProbe, compute_probe_id

    lm = load_model(model_dir)
    fmt = ThinkingFormat()
    first = RefusalProbe.load_for(probe_dir, lm) if probe_dir else _random_probe(lm, num_layers(lm.model) // 2, 0)
    flipped = first.weight.flip(0)  # another probe on the same layer: a new id, the same cost
    second = RefusalProbe(flipped, first.bias, replace(first.meta, probe_id=compute_probe_id(
        flipped, first.bias, first.layer, lm.fingerprint, first.meta.position)))
    records = [CandidateRecord(id=content_id(p, ""), prompt=p, response="") for p in prompts]
    settings = ScoreSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, chunk_size=len(records))
    generate(lm, prompts[:batch_size], fmt, max_new_tokens=4, batch_size=batch_size)  # warm-up: first-call costs out
    plain_s, gens = _timed(lambda: generate(lm, prompts, fmt, max_new_tokens=max_new_tokens, batch_size=batch_size))
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.duckdb") as store:
        full_s, full = _timed(lambda: score_records(lm, first, store, records, fmt, settings))
        reprobe_s, again = _timed(lambda: score_records(lm, second, store, records, fmt, settings))
    close_ids = lm.tokenizer.encode(fmt.before_close + fmt.close_marker, add_special_tokens=False)
    spans = [reasoning_span(g, close_ids, max_new_tokens) for g in gens]
    sequences = [s.sequence for s in spans]
    probe_s, _ = _timed(lambda: probe_traces(lm, first, sequences, [s.span for s in spans], batch_size=batch_size))

    def bare() -> None:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        with stop_after_layer(lm.model, first.layer), torch.no_grad():
            for start in range(0, len(order), batch_size):
                ids, mask = pad_batch([sequences[i] for i in order[start:start + batch_size]], lm.tokenizer.pad_token_id or 0,
                                      side="right")
                try:
                    lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
                except StopForward:
                    pass

    bare_s, _ = _timed(bare)
    tokens = sum(len(g.generated_ids) for g in gens)
    return {
        "model": str(model_dir), "n": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "generated_tokens": tokens, "parameters": sum(p.numel() for p in lm.model.parameters()),
        "vocab_size": int(lm.model.config.vocab_size), "probe_layer": first.layer,
        "seconds": {"plain_generate": plain_s, "full_scoring": full_s, "reprobe": reprobe_s, "probe_pass": probe_s,
                    "bare_forward": bare_s},
        "full_scoring_generations": full.n_generated, "reprobe_generations": again.n_generated,
        "ratios": {"reprobe_speedup": full_s / reprobe_s, "full_scoring_over_plain_generate": full_s / plain_s,
                   "probe_pass_throughput_over_bare_forward": bare_s / probe_s},
    }


def run_reprobe_bench(organism_dir: str | Path, probe_dir: str | Path, prompts_file: str | Path, *, n: int,
                      max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    from training.prompts import read_prompts

    prompts = [p.prompt for p in read_prompts(prompts_file)][:n]
    out = {"organism": bench_model(organism_dir, prompts, probe_dir, max_new_tokens=max_new_tokens, batch_size=batch_size)}
    with tempfile.TemporaryDirectory() as tmp:
        realistic = build_realistic_model(organism_dir, Path(tmp) / "realistic")
        out["realistic"] = bench_model(realistic, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return out
