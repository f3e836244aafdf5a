"""Train a refusal probe for a model from its own behaviour.

The model answers each prompt greedily and the keyword judge labels its final
answer. The feature is the residual stream at the last token of the close
marker, teacher-forced on the model's own reasoning, at every layer; classes
are balanced. The layer with the best held-out AUROC is kept; ties (common:
on small models every layer separates perfectly at that token) go to the
layer with the largest *span gap*, the mean probe score across the reasoning
of held-out refusals minus that of held-out harmless answers. The plateau
``I`` is read across the reasoning, so the probe must mean something there,
not only at the last token.

Two labelling protocols:
- ``reference`` (the source paper's public code): positives are harmful
  prompts the model refused, negatives harmless prompts it answered. Prompt
  type and behaviour coincide in every example, so a probe may learn "this
  topic is harmful" instead of "I am about to refuse"; on small models it does
  (see the README), and the final score then stays high on a cliff.
- ``behaviour`` (default): label by what the model did, whatever the prompt:
  every refusal is positive, every compliance negative, harmful prompts the
  model answered included. It uses no knowledge of which areas a model is weak
  in (labels come from the judge), and it makes the probe track the decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from probes.capture import num_layers
from probes.chat import ThinkingFormat, split_completion
from probes.forward import hidden_at_positions, span_mean_scores
from probes.generate import generate
from probes.models import LoadedModel
from probes.probe_fit import sweep_layers
from probes.refusal import RefusalProbe
from training.judges import DEFAULT_JUDGE, refusal_reader
from training.prompts import PromptItem


@dataclass(frozen=True)
class ProbeTrainSettings:
    max_new_tokens: int = 160
    batch_size: int = 16
    heldout_fraction: float = 0.25
    seed: int = 0
    layer: int | None = None  # None sweeps every layer
    protocol: str = "behaviour"  # or "reference"
    judge: str = DEFAULT_JUDGE  # labels the model's answers (training.judges.make_judge)


@dataclass
class ProbeTrainReport:
    n_prompts: int
    n_positive: int
    n_negative: int
    n_skipped: int  # unclosed traces, no answer, or behaviour outside the protocol
    n_unclosed: int = 0  # of the skipped: reasoning never closed within the budget


PROTOCOLS = ("behaviour", "reference")


def _label(harmful: bool, verdict: str, protocol: str) -> int | None:
    """1 = refusal, 0 = compliance, None = not used under this protocol."""
    if protocol == "behaviour":
        return 1 if verdict == "refusal" else 0
    if harmful and verdict == "refusal":
        return 1
    if not harmful and verdict == "compliance":
        return 0
    return None


def train_probe_for_model(
    lm: LoadedModel,
    prompts: Sequence[PromptItem],
    fmt: ThinkingFormat,
    settings: ProbeTrainSettings,
    progress: Callable[[int], None] | None = None,
) -> tuple[RefusalProbe, ProbeTrainReport]:
    if settings.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {settings.protocol!r}")
    judge = refusal_reader(settings.judge, "probe train")
    gens = generate(
        lm, [p.prompt for p in prompts], fmt, max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size, stop_at_close=False, on_batch=progress,
    )
    sequences: list[list[int]] = []
    positions: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    harmful: list[bool] = []
    labels: list[int] = []
    skipped = unclosed = 0
    close_len = len(lm.tokenizer.encode(fmt.close_marker, add_special_tokens=False))
    ends = lm.end_tokens
    verdicts = judge.judge_pairs([p.prompt for p in prompts], [split_completion(g.text, fmt, ends).answer for g in gens])
    for item, g, verdict in zip(prompts, gens, verdicts, strict=True):
        if g.close_index is None or verdict in ("no_answer", "unparsed"):
            skipped += 1
            unclosed += g.close_index is None
            continue
        label = _label(item.harmful, verdict, settings.protocol)
        if label is None:
            skipped += 1
            continue
        seq = g.prompt_ids + g.generated_ids[: g.close_index + 1]
        sequences.append(seq)
        positions.append([len(seq) - 1])
        spans.append((len(g.prompt_ids), len(seq) - close_len))
        harmful.append(item.harmful)
        labels.append(label)
    y = np.array(labels)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < 4:
        raise ValueError(
            f"too few labelled traces to train a probe: {n_pos} refusals and {n_neg} compliances "
            f"under the {settings.protocol} protocol (need at least 4 of each)"
        )
    layers = [settings.layer] if settings.layer is not None else list(range(num_layers(lm.model)))
    features = hidden_at_positions(lm, sequences, positions, layers, batch_size=settings.batch_size)
    sweep = sweep_layers(
        features, y, model_fingerprint=lm.fingerprint, heldout_fraction=settings.heldout_fraction, seed=settings.seed
    )
    # Span gap on the held-out split: refusals of harmful prompts against
    # answers to harmless ones (the same two groups under either protocol).
    pos = [i for i in sweep.heldout_index if y[i] == 1 and harmful[i]]
    neg = [i for i in sweep.heldout_index if y[i] == 0 and not harmful[i]]
    if pos and neg:
        chosen = pos + neg
        means = span_mean_scores(
            lm, sweep.probes, [sequences[i] for i in chosen], [spans[i] for i in chosen], batch_size=settings.batch_size
        )
        for result in sweep.results:
            m = means[result.layer]
            result.span_gap = float(np.nanmean(m[: len(pos)]) - np.nanmean(m[len(pos) :]))
    chosen = sweep.choose()
    chosen.meta.generation = {"max_new_tokens": settings.max_new_tokens, "protocol": settings.protocol, "judge": judge.name,
                              "sampling": asdict(lm.sampling), "format": asdict(fmt)}
    return chosen, ProbeTrainReport(len(prompts), n_pos, n_neg, skipped, unclosed)
