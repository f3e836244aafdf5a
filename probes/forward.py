"""Teacher-forced forward passes that read the residual stream.

Sequences are length-bucketed and right-padded (so positions need no shifting),
and each pass stops right after the deepest layer it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from probes.batching import pad_batch
from probes.capture import StopForward, capture_residual, num_layers, stop_after_layer
from probes.models import LoadedModel
from probes.refusal import RefusalProbe


def batched_residuals(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    layers: Sequence[int],
    batch_size: int,
) -> Iterator[tuple[list[int], dict[int, torch.Tensor]]]:
    """Yield (sequence indices, layer -> [batch, width, hidden]) per batch."""
    n_layers = num_layers(lm.model)
    resolved = sorted({layer % n_layers for layer in layers})
    deepest = resolved[-1]
    pad_id = lm.tokenizer.pad_token_id or 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with capture_residual(lm.model, resolved) as captured, stop_after_layer(lm.model, deepest):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = pad_batch([sequences[i] for i in idx], pad_id, side="right")
            captured.clear()
            try:
                with torch.no_grad():
                    lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            except StopForward:
                pass
            yield idx, {layer: captured[layer] for layer in resolved}


def hidden_at_positions(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict[int, np.ndarray]:
    """Hidden states at one position per sequence, for each layer:
    ``layer -> [n_sequences, hidden]`` as float32 numpy (for probe training)."""
    if any(len(p) != 1 for p in positions):
        raise ValueError("hidden_at_positions takes exactly one position per sequence")
    out: dict[int, np.ndarray] = {}
    for idx, captured in batched_residuals(lm, sequences, layers, batch_size):
        for layer, hidden in captured.items():
            if layer not in out:
                out[layer] = np.zeros((len(sequences), hidden.shape[-1]), dtype=np.float32)
            for row, i in enumerate(idx):
                out[layer][i] = hidden[row, positions[i][0]].float().cpu().numpy()
    return out


def probe_traces(
    lm: LoadedModel,
    probe: RefusalProbe,
    sequences: Sequence[list[int]],
    spans: Sequence[tuple[int, int]],
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Per-token refusal scores over ``spans[i] = (start, end)`` (end exclusive) of
    each teacher-forced sequence. Scores are computed on the model's device."""
    traces: list[np.ndarray | None] = [None] * len(sequences)
    for idx, captured in batched_residuals(lm, sequences, [probe.layer], batch_size):
        hidden = captured[probe.layer % num_layers(lm.model)]
        scores = probe.scores(hidden).cpu().numpy()
        for row, i in enumerate(idx):
            start, end = spans[i]
            traces[i] = scores[row, start:end].astype(np.float64)
        if on_batch is not None:
            on_batch(len(idx))
    return [t for t in traces if t is not None]


def span_mean_scores(
    lm: LoadedModel,
    probes: dict[int, RefusalProbe],
    sequences: Sequence[list[int]],
    spans: Sequence[tuple[int, int]],
    *,
    batch_size: int = 16,
) -> dict[int, np.ndarray]:
    """For each layer's probe, the mean score over ``spans[i]`` of each sequence,
    in one pass that reads every probed layer (no hidden states are kept)."""
    out = {layer: np.zeros(len(sequences)) for layer in probes}
    n_layers = num_layers(lm.model)
    for idx, captured in batched_residuals(lm, sequences, list(probes), batch_size):
        for layer, probe in probes.items():
            scores = probe.scores(captured[layer % n_layers]).cpu().numpy()
            for row, i in enumerate(idx):
                start, end = spans[i]
                out[layer][i] = float(scores[row, start:end].mean()) if end > start else float("nan")
    return out
