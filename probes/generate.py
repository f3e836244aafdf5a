"""Batched generation of a model's own reasoning (and answer), greedy or sampled
as the model's ``Sampling`` says.

Prompts are sorted by length and cut into batches (length bucketing), so little
compute goes to padding; outputs come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from probes.batching import pad_batch
from probes.chat import ThinkingFormat, marker_end_index, render_generation_prompt, stop_token_ids
from probes.models import LoadedModel, Sampling


@dataclass(frozen=True)
class Generation:
    prompt_text: str
    prompt_ids: list[int]
    generated_ids: list[int]  # new tokens only, up to and including the stop token
    text: str  # decoded new tokens (special tokens kept, so markers are visible)
    close_index: int | None  # index in generated_ids of the close marker's last token


@dataclass(frozen=True)
class ScoredSpan:
    """What the probe reads for one generation: the teacher-forced sequence and
    the reasoning span in it (end exclusive, close marker included)."""

    sequence: list[int]
    span: tuple[int, int]
    closed: bool  # False: the trace hit the length cap and was closed by force


def reasoning_span(g: Generation, close_ids: list[int], max_reasoning_tokens: int) -> ScoredSpan:
    """The reasoning of ``g`` through its close marker. A length-capped trace is
    closed by force (``close_ids`` appended), so I′ is read where the model
    would have to commit if it stopped thinking now."""
    closed = g.close_index is not None and g.close_index < max_reasoning_tokens
    if closed:
        reasoning = g.generated_ids[: g.close_index + 1]
    else:
        reasoning = g.generated_ids[:max_reasoning_tokens] + close_ids
    sequence = g.prompt_ids + reasoning
    return ScoredSpan(sequence, (len(g.prompt_ids), len(sequence)), closed)


def decoding_kwargs(sampling: Sampling) -> dict[str, object]:
    """``generate`` arguments for ``sampling``; every one is given, so a checkpoint's own
    ``generation_config`` (its card's defaults) never changes decoding behind the record."""
    if sampling.greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None}


@contextmanager
def _seeded(lm: LoadedModel, batch_start: int) -> Iterator[None]:
    """Seed sampling per batch (from the settings' seed and the batch's place) without
    disturbing the caller's random state."""
    if lm.sampling.greedy:
        yield
        return
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(lm.sampling.seed * 1_000_003 + batch_start)
        yield


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    fmt: ThinkingFormat,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    stop_at_close: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Continuations of each prompt's generation prompt (decoded per ``lm.sampling``).

    With ``stop_at_close`` generation ends at the close marker (scoring needs
    only the reasoning); otherwise it runs through the answer to EOS.
    """
    tok = lm.tokenizer
    texts = [render_generation_prompt(tok, p, fmt) for p in prompts]
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    # The checkpoint's own end-of-turn ids (generation_config: gpt-oss <|return|>/<|call|>, Llama 3
    # <|eot_id|>) stop it as well as the tokenizer's EOS.
    stops = stop_token_ids(tok, ([fmt.close_marker] if stop_at_close else []) + list(lm.end_tokens))
    if remote_allowed(lm):
        return _generate_remote(lm, texts, encoded, stops, fmt, max_new_tokens, on_batch)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = pad_batch([encoded[i] for i in idx], pad_id, side="left")
        width = input_ids.shape[1]
        with _seeded(lm, start):
            out = lm.model.generate(
                input_ids=input_ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                **decoding_kwargs(lm.sampling),
            )
        new = out[:, width:].tolist()
        for row, i in enumerate(idx):
            ids = new[row]
            # Trim at the first stop token; later positions are padding.
            cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:cut]
            results[i] = Generation(
                prompt_text=texts[i],
                prompt_ids=encoded[i],
                generated_ids=ids,
                text=tok.decode(ids, skip_special_tokens=False),
                close_index=marker_end_index(ids, tok, fmt.close_marker),
            )
        if on_batch is not None:
            on_batch(len(idx))
    return [r for r in results if r is not None]


def remote_allowed(lm: LoadedModel) -> bool:
    """Whether this generation may go to the server: only the model as loaded, with its LoRA adapter
    only where the server holds that adapter too (``RemoteGenerator.load_adapter``). A server cannot
    see a steering hook on the local copy, so steered generation stays in-process rather than
    silently generating unsteered."""
    if lm.generator is None or not lm.generator.serves(lm.adapter):
        return False
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def _generate_remote(lm: LoadedModel, texts: list[str], encoded: list[list[int]], stops: list[int], fmt: ThinkingFormat,
                     max_new_tokens: int, on_batch: Callable[[int], None] | None) -> list[Generation]:
    from probes.remote_generate import GeneratorRowError

    tok = lm.tokenizer
    lm.generator.check(tok, lm.fingerprint)
    done = lm.generator.complete(encoded, max_tokens=max_new_tokens, stop_token_ids=stops, sampling=lm.sampling,
                                 on_done=on_batch, adapter=None if lm.adapter is None else str(lm.adapter))
    refused = [(i, d) for i, d in enumerate(done) if isinstance(d, GeneratorRowError)]
    if refused:
        raise refused[0][1]  # the caller re-runs a failed chunk row by row, so the refused row is found and quarantined
    results: list[Generation] = []
    for i, completion in enumerate(done):
        ids = completion.token_ids
        cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))  # as in-process: through the first stop
        ids = ids[:cut]
        results.append(Generation(prompt_text=texts[i], prompt_ids=encoded[i], generated_ids=ids,
                                  text=tok.decode(ids, skip_special_tokens=False),
                                  close_index=marker_end_index(ids, tok, fmt.close_marker)))
    return results
