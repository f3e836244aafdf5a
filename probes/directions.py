"""Difference-in-means steering directions: the refusal direction and the
benign (harmless-data-only) vectors.

Refusal direction, following the refusal-direction pipeline: for every layer
``l`` and every post-instruction position ``p`` (the template tokens after the
user's text), ``r[l, p] = mean(resid_pre harmful) − mean(resid_pre harmless)``.
One candidate is chosen on a validation split:

1. ``refusal_ablated``: refusal rate on harmful validation prompts with the
   candidate ablated everywhere (lower is better);
2. ``induce_refusal``: refusal rate on harmless validation prompts with the
   candidate added at its layer; it must rise above the unsteered rate by more
   than ``induce_min_gain`` (the direction must *cause* some refusal, not merely
   correlate with it; the reference asks the same of its logit score);
3. ``kl_harmless``: KL of the next-token distribution at the last prompt
   position on harmless validation prompts, ablated against clean; it must stay
   under ``kl_max`` (the ablation must not simply break the model);
4. layers in the last ``prune_layer_fraction`` are excluded (they tend to act
   on output tokens directly).

The reference scores refusal by next-token logits of refusal phrases. A reasoning
model refuses only after its thinking, so here the rates come from generated
answers read by the same judge as the evaluation.

Benign vectors are the mean over answer tokens of one teacher-forced answer
style minus another, on harmless prompts only (``span_mean_difference``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from probes.batching import pad_batch
from probes.capture import capture_block_inputs, num_layers
from probes.chat import ThinkingFormat, post_instruction_length, render_generation_prompt, split_completion
from probes.files import write_json_atomic
from probes.generate import generate
from probes.models import LoadedModel, model_hidden_size
from probes.refusal import ProbeMismatchError
from probes.steering import ablate_direction, add_vector

IsRefusal = Callable[[str, str], bool]  # (request, final answer) -> refused?


def _encode_prompts(lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat) -> list[list[int]]:
    return [lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, p, fmt), add_special_tokens=False) for p in prompts]


def _left_padded_forward(lm: LoadedModel, batch: Sequence[list[int]]) -> torch.Tensor:
    """Logits of a left-padded batch, with position ids that skip the pads."""
    pad = lm.tokenizer.pad_token_id or 0
    input_ids, mask = pad_batch(batch, pad, side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm.model(
        input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device),
        position_ids=positions.to(lm.device), use_cache=False,
    ).logits


@torch.no_grad()
def mean_post_instruction_activations(
    lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat, n_positions: int, *, batch_size: int = 16
) -> torch.Tensor:
    """Mean ``resid_pre`` at the last ``n_positions`` prompt tokens: ``[layers, n_positions, hidden]``."""
    if not prompts:
        raise ValueError("need at least one prompt to take a mean over")
    n_layers = num_layers(lm.model)
    encoded = _encode_prompts(lm, prompts, fmt)
    total = torch.zeros(n_layers, n_positions, model_hidden_size(lm), dtype=torch.float64)
    with capture_block_inputs(lm.model, range(n_layers)) as captured:
        for start in range(0, len(encoded), batch_size):
            _left_padded_forward(lm, encoded[start : start + batch_size])
            for layer in range(n_layers):
                total[layer] += captured[layer][:, -n_positions:, :].double().sum(0).cpu()
    return (total / len(encoded)).float()


@torch.no_grad()
def span_mean_difference(
    lm: LoadedModel,
    positive: Sequence[tuple[list[int], int]],
    negative: Sequence[tuple[list[int], int]],
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean ``resid_pre`` over the tokens from ``start`` to the end of each
    (sequence, start) in ``positive`` minus the same for ``negative``: ``[layers, hidden]``."""
    n_layers = num_layers(lm.model)

    def span_mean(items: Sequence[tuple[list[int], int]]) -> torch.Tensor:
        if not items:
            raise ValueError("a contrast side needs at least one sequence")
        total = torch.zeros(n_layers, model_hidden_size(lm), dtype=torch.float64)
        count = 0
        pad = lm.tokenizer.pad_token_id or 0
        with capture_block_inputs(lm.model, range(n_layers)) as captured:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                input_ids, mask = pad_batch([s for s, _ in chunk], pad, side="right")
                lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
                for row, (seq, first) in enumerate(chunk):
                    for layer in range(n_layers):
                        total[layer] += captured[layer][row, first : len(seq)].double().sum(0).cpu()
                    count += len(seq) - first
        return total / max(count, 1)

    return (span_mean(positive) - span_mean(negative)).float()


@dataclass(frozen=True)
class DirectionSettings:
    n_positions: int = 5  # post-instruction positions tried (fewer if the template has fewer)
    prune_layer_fraction: float = 0.2
    # None turns the induce check off (see the README: on the organism no candidate induces
    # refusal reliably, and the check then picks by noise).
    induce_min_gain: float | None = 0.0
    kl_max: float = 0.1
    max_new_tokens: int = 128
    batch_size: int = 16


@dataclass
class Candidate:
    layer: int
    position: int  # negative: offset from the end of the generation prompt
    refusal_ablated: float
    induce_refusal: float
    kl_harmless: float
    passed: bool


@dataclass
class RefusalDirection:
    vector: torch.Tensor  # raw difference in means (its norm is the natural actadd scale)
    layer: int
    position: int
    model_fingerprint: str
    hidden_size: int
    candidates: list[Candidate] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)  # validation refusal rates without any edit
    note: str = ""
    # Every (layer, position) difference in means, [layers, positions, hidden]: activation
    # addition may use another layer's own vector than the one ablation chose.
    all_vectors: torch.Tensor | None = None

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"direction": self.vector.contiguous().float()}
        if self.all_vectors is not None:
            tensors["all_vectors"] = self.all_vectors.contiguous().float()
        save_file(tensors, str(out / "direction.safetensors"))
        meta = {k: v for k, v in asdict(self).items() if k not in ("vector", "all_vectors")}
        write_json_atomic(out / "direction.json", meta)
        return out

    @classmethod
    def load_for(cls, directory: str | Path, lm: LoadedModel) -> RefusalDirection:
        root = Path(directory)
        if not (root / "direction.json").exists():
            raise FileNotFoundError(f"no refusal direction in {root} (run curate attacks prepare first)")
        meta = json.loads((root / "direction.json").read_text())
        tensors = load_file(str(root / "direction.safetensors"))
        vector = tensors["direction"]
        if vector.numel() != model_hidden_size(lm):
            raise ProbeMismatchError(f"direction in {root} has size {vector.numel()}, model has {model_hidden_size(lm)}")
        meta["candidates"] = [Candidate(**c) for c in meta.get("candidates", [])]
        return cls(vector=vector, all_vectors=tensors.get("all_vectors"), **meta)

    def at(self, layer: int, position: int) -> torch.Tensor:
        """The difference in means at (layer, position), position counted from the end (−1 = last)."""
        if self.all_vectors is None:
            raise ValueError("this direction was saved without its per-layer vectors")
        return self.all_vectors[layer, self.all_vectors.shape[1] + position]


def _refusal_rate(lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat, is_refusal: IsRefusal,
                  settings: DirectionSettings) -> float:
    gens = generate(lm, prompts, fmt, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                    stop_at_close=False)
    ends = lm.end_tokens
    return sum(is_refusal(p, split_completion(g.text, fmt, ends).answer) for p, g in zip(prompts, gens, strict=True)) / len(gens)


@torch.no_grad()
def last_token_logprobs(lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat, batch_size: int = 16) -> torch.Tensor:
    """Next-token log-probabilities at the end of each generation prompt: ``[n, vocab]``."""
    encoded = _encode_prompts(lm, prompts, fmt)
    rows = [F.log_softmax(_left_padded_forward(lm, encoded[s : s + batch_size])[:, -1].float(), -1).cpu()
            for s in range(0, len(encoded), batch_size)]
    return torch.cat(rows)


def mean_kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _all_differences(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], fmt: ThinkingFormat,
                     settings: DirectionSettings) -> torch.Tensor:
    n_pos = min(settings.n_positions, post_instruction_length(lm.tokenizer, fmt))
    return (mean_post_instruction_activations(lm, harmful, fmt, n_pos, batch_size=settings.batch_size)
            - mean_post_instruction_activations(lm, harmless, fmt, n_pos, batch_size=settings.batch_size))


def extract_refusal_direction(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], fmt: ThinkingFormat, layer: int, position: int,
    settings: DirectionSettings = DirectionSettings(), note: str = "",
) -> RefusalDirection:
    """The difference in means at a (layer, position) chosen elsewhere (e.g. on a
    base model whose fine-tune is now under attack), without a new selection."""
    diffs = _all_differences(lm, harmful, harmless, fmt, settings)
    return RefusalDirection(vector=diffs[layer, diffs.shape[1] + position].clone(), layer=layer, position=position,
                            model_fingerprint=lm.fingerprint, hidden_size=int(diffs.shape[-1]), settings=asdict(settings),
                            note=note, all_vectors=diffs)


def select_refusal_direction(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    fmt: ThinkingFormat,
    is_refusal: IsRefusal,
    settings: DirectionSettings = DirectionSettings(),
    progress: Callable[[str], None] | None = None,
) -> RefusalDirection:
    """Extract every (layer, position) candidate from ``harmful``/``harmless`` and
    choose one on the validation prompts (see the module docstring)."""
    diffs = _all_differences(lm, harmful, harmless, fmt, settings)
    n_layers, n_pos = diffs.shape[0], diffs.shape[1]
    # Layer 0 at template tokens is one fixed embedding, so at least layers 0 and 1 stay in
    # play even for a 2-layer model that the fraction alone would cut to layer 0.
    max_layer = min(n_layers, max(2, int(n_layers * (1 - settings.prune_layer_fraction))))
    clean_logp = last_token_logprobs(lm, harmless_val, fmt, settings.batch_size)
    baseline = {
        "refusal_harmful_val": _refusal_rate(lm, harmful_val, fmt, is_refusal, settings),
        "refusal_harmless_val": _refusal_rate(lm, harmless_val, fmt, is_refusal, settings),
    }
    candidates: list[Candidate] = []
    for layer in range(max_layer):
        for p in range(n_pos):
            vector = diffs[layer, p]
            if float(vector.norm()) <= 1e-6 * float(diffs.norm()):
                continue  # layer 0 at template tokens is one fixed embedding: no difference to steer with
            if progress is not None:
                progress(f"layer {layer} position {p - n_pos}")
            with ablate_direction(lm.model, vector):
                refusal = _refusal_rate(lm, harmful_val, fmt, is_refusal, settings)
                kl = mean_kl(clean_logp, last_token_logprobs(lm, harmless_val, fmt, settings.batch_size))
            with add_vector(lm.model, vector, [layer], 1.0):
                induce = _refusal_rate(lm, harmless_val, fmt, is_refusal, settings)
            induces = settings.induce_min_gain is None or induce > baseline["refusal_harmless_val"] + settings.induce_min_gain
            passed = induces and kl <= settings.kl_max
            candidates.append(Candidate(layer, p - n_pos, refusal, induce, kl, passed))
    if not candidates:
        raise ValueError("every candidate direction is zero: harmful and harmless prompts look the same to this model "
                         "at the post-instruction positions")
    passing = [c for c in candidates if c.passed]
    note = ""
    if not passing:
        # Report rather than fail: the attack matrix still runs, and the note says the filters were not met.
        note = (f"no candidate raised harmless refusal above {baseline['refusal_harmless_val']:.3f} "
                f"+ {settings.induce_min_gain} with kl <= {settings.kl_max}; "
                "chose the lowest ablated refusal among all candidates")
        passing = candidates
    best = min(passing, key=lambda c: (c.refusal_ablated, c.kl_harmless, -c.induce_refusal))
    return RefusalDirection(
        vector=diffs[best.layer, best.position + n_pos].clone(),
        layer=best.layer,
        position=best.position,
        all_vectors=diffs,
        model_fingerprint=lm.fingerprint,
        hidden_size=int(diffs.shape[-1]),
        candidates=candidates,
        settings=asdict(settings),
        baseline=baseline,
        note=note,
    )
