"""``curate bench``: the scoring engine against the way a newcomer would write it,
measured in the same run on the same examples, plus the selection benchmark.

Naive baseline, as the issue describes it: one example at a time;
``generate`` without batching; a full forward pass with
``output_hidden_states=True`` (every layer kept); the probe layer's states
moved to numpy; scikit-learn ``predict_proba`` called per token. One honest
correction: transformers returns the *last* layer's state after the final
norm, while the probe reads the block's output before it, so for a probe on
the last layer the baseline reads that block's output with a hook instead
(otherwise its scores would be wrong, not slow).

Each side runs in its own subprocess so peak memory is its own; the parent
compares the traces and prints ratios engine / baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from curation.experiments.process_memory import peak_rss_mb, rss_mb


def _engine(lm, probe, prompts, fmt, max_new_tokens: int, batch_size: int):
    from probes.forward import probe_traces
    from probes.generate import generate, reasoning_span

    close_ids = lm.tokenizer.encode(fmt.before_close + fmt.close_marker, add_special_tokens=False)
    gens = generate(lm, prompts, fmt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scored = [reasoning_span(g, close_ids, max_new_tokens) for g in gens]
    sequences, spans = [x.sequence for x in scored], [x.span for x in scored]
    return sequences, spans, probe_traces(lm, probe, sequences, spans, batch_size=batch_size)


def _naive(lm, probe, prompts, fmt, max_new_tokens: int, known: list[list[int]] | None, known_spans):
    import torch
    from sklearn.linear_model import LogisticRegression

    from probes.capture import capture_residual, num_layers
    from probes.chat import marker_end_index, render_generation_prompt, stop_token_ids

    clf = LogisticRegression()
    clf.classes_ = np.array([0, 1])
    clf.coef_ = probe.weight.double().numpy()[None, :]
    clf.intercept_ = np.array([probe.bias])
    tok = lm.tokenizer
    stops = stop_token_ids(tok, [fmt.close_marker])
    close_ids = tok.encode(fmt.before_close + fmt.close_marker, add_special_tokens=False)
    last = num_layers(lm.model) - 1
    layer = probe.layer % (last + 1)
    sequences, spans, traces = [], [], []
    for i, prompt in enumerate(prompts):
        if known is None:
            ids = tok.encode(render_generation_prompt(tok, prompt, fmt), add_special_tokens=False)
            with torch.no_grad():
                out = lm.model.generate(input_ids=torch.tensor([ids], device=lm.device), max_new_tokens=max_new_tokens,
                                        do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            new = out[0, len(ids):].tolist()
            close = marker_end_index(new, tok, fmt.close_marker)
            reasoning = new[: close + 1] if close is not None and close < max_new_tokens else new[:max_new_tokens] + close_ids
            seq, span = ids + reasoning, (len(ids), len(ids) + len(reasoning))
        else:
            seq, span = known[i], known_spans[i]
        with torch.no_grad(), capture_residual(lm.model, [last]) as cap:
            out = lm.model(input_ids=torch.tensor([seq], device=lm.device), output_hidden_states=True)
        hidden = (cap[last] if layer == last else out.hidden_states[layer + 1])[0].float().cpu().numpy()
        trace = np.array([clf.predict_proba(hidden[t : t + 1])[0, 1] for t in range(span[0], span[1])])
        sequences.append(seq)
        spans.append(span)
        traces.append(trace)
    return sequences, spans, traces


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """One side of the benchmark, run in a subprocess."""
    import torch

    from probes.chat import ThinkingFormat
    from probes.models import load_model
    from probes.refusal import RefusalProbe
    from training.prompts import read_prompts

    lm = load_model(args["model"], device=args["device"], dtype=args["dtype"])
    probe = RefusalProbe.load_for(args["probe"], lm)
    prompts = [p.prompt for p in read_prompts(args["prompts"])][: args["n"]]
    fmt = ThinkingFormat()
    known = json.loads(Path(args["known"]).read_text()) if args.get("known") else None
    rss_loaded = rss_mb()
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Warm-up outside the timing: first calls pay one-off costs on both sides.
    warm = prompts[:2]
    if args["side"] == "engine":
        _engine(lm, probe, warm, fmt, 8, args["batch_size"])
    else:
        _naive(lm, probe, warm, fmt, 8, None, None)
    started = time.perf_counter()
    if args["side"] == "engine":
        if known:
            seqs, spans, traces = _engine_known(lm, probe, known, args["batch_size"])
        else:
            seqs, spans, traces = _engine(lm, probe, prompts, fmt, args["max_new_tokens"], args["batch_size"])
    else:
        seqs, spans, traces = _naive(lm, probe, prompts, fmt, args["max_new_tokens"],
                                     known["sequences"] if known else None, known["spans"] if known else None)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if lm.device.type == "cuda" else None
    return {
        "side": args["side"],
        "seconds": seconds,
        "n": len(seqs),
        "tokens_scored": int(sum(e - s for s, e in spans)),
        "tokens_total": int(sum(len(s) for s in seqs)),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "peak_device_mb": peak_device,
        "sequences": seqs,
        "spans": spans,
        "traces": [t.tolist() for t in traces],
        "device": str(lm.device),
        "dtype": str(lm.model.dtype),
    }


def _engine_known(lm, probe, known: dict[str, Any], batch_size: int):
    from probes.forward import probe_traces

    seqs, spans = known["sequences"], [tuple(s) for s in known["spans"]]
    return seqs, spans, probe_traces(lm, probe, seqs, spans, batch_size=batch_size)


def _run_side(args: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "args.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps(args))
        code = "import json,sys; from curation.experiments.bench import worker; a=json.load(open(sys.argv[1])); json.dump(worker(a), open(sys.argv[2],'w'))"
        subprocess.run([sys.executable, "-c", code, str(spec), str(out)], check=True)
        return json.loads(out.read_text())


def compare(engine: dict[str, Any], naive: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Agreement of the two sides' traces on examples whose reasoning came out identical."""
    same = [i for i in range(engine["n"]) if engine["sequences"][i] == naive["sequences"][i]]
    diffs = [float(np.max(np.abs(np.array(engine["traces"][i]) - np.array(naive["traces"][i])))) for i in same]
    return {
        "n_identical_reasoning": len(same),
        "n": engine["n"],
        "max_abs_diff": max(diffs) if diffs else None,
        "agree": bool(same) and len(same) >= 0.9 * engine["n"] and max(diffs) <= tolerance,
    }


def _summary(engine: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    def rates(side: dict[str, Any]) -> dict[str, Any]:
        return {
            "seconds": side["seconds"],
            "examples_per_s": side["n"] / side["seconds"],
            "tokens_per_s": side["tokens_scored"] / side["seconds"],
            "peak_rss_mb": side["peak_rss_mb"],
            "peak_above_load_mb": side["peak_rss_mb"] - side["rss_after_load_mb"],
            "peak_device_mb": side["peak_device_mb"],
        }

    e, b = rates(engine), rates(naive)
    ratios = {
        "examples_per_s": e["examples_per_s"] / b["examples_per_s"],
        "tokens_per_s": e["tokens_per_s"] / b["tokens_per_s"],
        "peak_rss": e["peak_rss_mb"] / b["peak_rss_mb"],
    }
    if e["peak_device_mb"] and b["peak_device_mb"]:
        ratios["peak_device"] = e["peak_device_mb"] / b["peak_device_mb"]
    return {"engine": e, "baseline": b, "ratio_engine_over_baseline": ratios}


def run_scoring_bench(model: str, probe: str, prompts: str, *, n: int, max_new_tokens: int, batch_size: int,
                      device: str, dtype: str, tolerance: float) -> dict[str, Any]:
    base = {"model": model, "probe": probe, "prompts": prompts, "n": n, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "device": device, "dtype": dtype}
    engine = _run_side({**base, "side": "engine"})
    naive = _run_side({**base, "side": "naive"})
    result: dict[str, Any] = {"full_scoring": _summary(engine, naive), "full_agreement": compare(engine, naive, tolerance)}
    # Teacher-forced rescoring: the reasoning is known (the engine's), no generation.
    with tempfile.TemporaryDirectory() as tmp:
        known = Path(tmp) / "known.json"
        known.write_text(json.dumps({"sequences": engine["sequences"], "spans": engine["spans"]}))
        tf_engine = _run_side({**base, "side": "engine", "known": str(known)})
        tf_naive = _run_side({**base, "side": "naive", "known": str(known)})
    result["rescoring"] = _summary(tf_engine, tf_naive)
    result["rescoring_agreement"] = compare(tf_engine, tf_naive, tolerance)
    result["device"] = engine["device"]
    result["dtype"] = engine["dtype"]
    result["n"] = engine["n"]
    result["tokens_scored"] = engine["tokens_scored"]
    return result


def run_store_bench(rows: int, trace_tokens: int = 1000, budget: str = "1.7%", directory: str | None = None) -> dict[str, Any]:
    """A store of ``rows`` scored examples with ``trace_tokens``-token traces and about as much
    reasoning text: size on disk, a selection on a fresh open, and ``curate status``."""
    from curation.pipeline.select import export_selection
    from curation.pipeline.store import Store

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = Path(tmp) / "store.duckdb"
        started = time.perf_counter()
        with Store(db) as store:
            store.fill_synthetic(rows, trace_tokens=trace_tokens, reasoning_chars=4 * trace_tokens)
            store.con.execute("CHECKPOINT")
        fill = time.perf_counter() - started
        size = db.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("store.duckdb.wal"))
        started = time.perf_counter()
        with Store(db) as store:
            manifest = export_selection(store, Path(tmp) / "sel.jsonl", strategy="cliff", budget_text=budget)
        select_s = time.perf_counter() - started
        started = time.perf_counter()
        with Store(db, read_only=True) as store:
            store.status()
        status_s = time.perf_counter() - started
    return {"rows": rows, "trace_tokens": trace_tokens, "reasoning_chars": 4 * trace_tokens, "fill_seconds": fill,
            "size_bytes": size, "bytes_per_row": size / rows, "n_selected": manifest.n_selected, "select_seconds": select_s,
            "status_seconds": status_s}


def run_select_bench(rows: int, budget: str = "1.7%") -> dict[str, Any]:
    """Fill a store with synthetic score rows and time a cliff selection and export."""
    from curation.pipeline.select import export_selection
    from curation.pipeline.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with Store(Path(tmp) / "bench.duckdb") as store:
            store.fill_synthetic(rows)
        fill = time.perf_counter() - started
        # Timed as `curate select` meets the store: a file another process wrote and closed.
        started = time.perf_counter()
        with Store(Path(tmp) / "bench.duckdb", read_only=True) as store:
            manifest = export_selection(store, Path(tmp) / "sel.jsonl", strategy="cliff", budget_text=budget)
        seconds = time.perf_counter() - started
    return {"rows": rows, "budget": budget, "n_selected": manifest.n_selected, "fill_seconds": fill, "select_seconds": seconds}
