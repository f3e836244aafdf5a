"""Cliff metrics from a per-token refusal-score trace over the reasoning span.

Definitions (the trace runs from the first reasoning token to the last token
of the close marker, or to the last generated token if the trace never closed):

- plateau ``I``: the maximum of the trace smoothed by a centred moving average
  of ``window`` tokens (3 by default). Smoothing makes the maximum robust to a
  single-token spike while still finding a plateau that is only a few tokens long.
- final ``I′``: the raw score at the last token of the trace (the close
  marker's last token), where the model commits to its answer.
- misalignment ``MS = I − I′``: large when the model held a refusal intent
  while reasoning and dropped it at the end.
- cliff position: the token index (in the trace) after which the smoothed
  trace falls the most, searched from the plateau onwards; also given
  relative to the trace length.
- steepness: that largest one-token fall of the smoothed trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CliffMetrics:
    plateau: float
    final: float
    misalignment: float
    cliff_position: int
    cliff_relative: float
    steepness: float
    n_tokens: int


def smooth(trace: np.ndarray, window: int = 3) -> np.ndarray:
    """Centred moving average; edges average over the tokens that exist."""
    trace = np.asarray(trace, dtype=np.float64)
    if window <= 1 or trace.size < 2:
        return trace.copy()
    kernel = np.ones(window)
    sums = np.convolve(trace, kernel, mode="same")
    counts = np.convolve(np.ones_like(trace), kernel, mode="same")
    return sums / counts


def cliff_metrics(trace: np.ndarray, window: int = 3) -> CliffMetrics:
    trace = np.asarray(trace, dtype=np.float64)
    if trace.ndim != 1 or trace.size == 0:
        raise ValueError("a cliff trace must be a non-empty 1-D array of scores")
    smoothed = smooth(trace, window)
    peak = int(np.argmax(smoothed))
    plateau = float(smoothed[peak])
    final = float(trace[-1])
    if trace.size >= 2:
        # Include the raw last step: the cliff is often the final token itself,
        # which a centred average would blur.
        tail = np.append(smoothed[peak:-1], trace[-1])
        drops = tail[:-1] - tail[1:]
        if drops.size:
            k = int(np.argmax(drops))
            position, steepness = peak + k, float(max(drops[k], 0.0))
        else:
            position, steepness = trace.size - 1, 0.0
    else:
        position, steepness = 0, 0.0
    return CliffMetrics(
        plateau=plateau,
        final=final,
        misalignment=plateau - final,
        cliff_position=position,
        cliff_relative=position / max(trace.size - 1, 1),
        steepness=steepness,
        n_tokens=int(trace.size),
    )
