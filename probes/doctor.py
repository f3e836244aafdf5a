"""Conformance checks of a model against its family adapter (``curate doctor``).

Every check measures one figure on the model in hand, with random directions
and a few synthetic prompts, and compares it with a limit:

- the template renders, a completion's thinking span is found, and a training
  target written in the family's format round-trips through tokenizer and template
  (gpt-oss: the checkpoint's template writes the same turns as openai-harmony);
- weight orthogonalisation equals ablation by hooks (and the ablation moves the logits);
- the router edit with every scale 1.0 leaves the logits unchanged, and a masked
  expert receives no tokens (it did before the mask);
- per-expert outputs add up to each MoE block's output (shared experts included);
- per-head attributions add up to each attention output projection;
- every attack's hooks and weight edits are gone after an exception inside it;
- the scoring engine's probe trace equals the naive one from ``output_hidden_states``.

A check that cannot run (the adapter is wrong for this model) fails with the error
as its detail instead of stopping the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict

import torch
from torch import nn

from probes.batching import pad_batch
from probes.capture import attention_head_layout, find_attention_output, num_layers
from probes.chat import (
    ThinkingFormat,
    build_completion,
    closed_before_thinking,
    marker_end_index,
    render_generation_prompt,
    split_completion,
)
from probes.doctor_base import ANSWER, PROMPTS, REASONING, CheckResult, DoctorContext, make_check
from probes.doctor_moe import check_expert_sum, check_router
from probes.experts import find_moe_layers, scale_expert_routing, shift_expert_outputs
from probes.families import family_of
from probes.forward import probe_traces
from probes.heads import scale_heads
from probes.models import LoadedModel, model_hidden_size
from probes.refusal import ProbeMetadata, RefusalProbe
from probes.steering import ablate_direction, add_vector, orthogonalized


def check_template(ctx: DoctorContext) -> list[CheckResult]:
    tok, fmt = ctx.lm.tokenizer, ctx.fmt
    opened = check_generation_prompt(tok, fmt)
    prompt = render_generation_prompt(tok, PROMPTS[0], fmt)
    opens = prompt.rstrip().endswith(fmt.open_marker.rstrip())
    results = [opened, make_check("template renders", "ends inside an open thinking block", float(opens), opens, repr(prompt[-60:]))]
    target = build_completion(REASONING, ANSWER, fmt)
    ids = tok.encode(target, add_special_tokens=False)
    close = marker_end_index(ids, tok, fmt.close_marker)
    found = close is not None and tok.decode(ids[: close + 1], skip_special_tokens=False).rstrip().endswith(fmt.close_marker)
    results.append(make_check("thinking span found", "close marker located in the completion's tokens",
                          float(close if close is not None else -1), found))
    full = prompt + target
    decoded = tok.decode(tok.encode(full, add_special_tokens=False), skip_special_tokens=False)
    split = split_completion(decoded[len(prompt):], fmt) if decoded.startswith(prompt) else None
    same = decoded == full and split is not None and (split.reasoning, split.answer) == (REASONING, ANSWER)
    detail = "" if same else f"decoded tail {decoded[len(prompt):][:80]!r}"
    rendered = _render_turn(tok, fmt)
    if same and rendered is not None and REASONING in rendered:
        # The template writes reasoning itself: the target must agree with it.
        opened = rendered[: rendered.index(REASONING)].rfind(fmt.open_marker)  # the turn's own, not one in a system text
        turn = split_completion(rendered[opened + len(fmt.open_marker):], fmt) if opened >= 0 else None
        same = turn is not None and turn.reasoning == REASONING and turn.answer.startswith(ANSWER)
        detail = "" if same else f"template writes the turn as {rendered[-120:]!r}"
    results.append(make_check("target round-trips", "prompt + target decode and split back unchanged", float(same), same, detail))
    if fmt.harmony:
        from probes.doctor_harmony import check_harmony_prompt

        results.append(check_harmony_prompt(tok, fmt))
    return results


def check_generation_prompt(tok, fmt: ThinkingFormat) -> CheckResult:
    """The template's own generation prompt (before any open marker is appended) must not close
    the thinking block after the user's turn. On failure, names the template argument, among
    those the declared families use, that makes it open."""
    messages = ([{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []) + [
        {"role": "user", "content": PROMPTS[0]}]

    def closes(kwargs: dict) -> str | None:
        gen, plain = (str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=g, **kwargs)) for g in (True, False))
        return closed_before_thinking(gen, plain, PROMPTS[0], fmt)

    problem = closes(fmt.template_kwargs)
    if problem is None:
        return make_check("generation prompt opens thinking", "no close marker after the user's turn", 1.0, True)
    fixes = [kw for kw in _known_template_kwargs() if closes({**fmt.template_kwargs, **kw}) is None]
    hint = (f"set --chat-template-kwargs '{json.dumps(fixes[0])}'" if fixes
            else "no known template argument opens it; pass the template's own with --chat-template-kwargs")
    return make_check("generation prompt opens thinking", "no close marker after the user's turn", 0.0, False, f"{problem}; {hint}")


def _known_template_kwargs() -> list[dict]:
    from probes.families import FAMILIES

    seen: list[dict] = []
    for family in FAMILIES.values():
        kw = dict(family.thinking.template_kwargs)
        if kw and kw not in seen:
            seen.append(kw)
    return seen


def _render_turn(tok, fmt: ThinkingFormat) -> str | None:
    messages = [{"role": "user", "content": PROMPTS[0]},
                {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING, "thinking": REASONING}]
    try:
        return tok.apply_chat_template(messages, tokenize=False, **fmt.template_kwargs)
    except Exception:  # a template that cannot render an assistant turn has nothing to compare
        return None


def check_orthogonalization(ctx: DoctorContext) -> list[CheckResult]:
    base = ctx.logits()
    with ablate_direction(ctx.lm.model, ctx.direction):
        hooked = ctx.logits()
    with orthogonalized(ctx.lm.model, ctx.direction):
        edited = ctx.logits()
    diff, moved = float((hooked - edited).abs().max()), float((hooked - base).abs().max())
    return [make_check("orthogonalisation = ablation", f"max |Δlogit| <= {1e-3 * ctx.tol:.0e}, ablation moves logits",
                   diff, diff <= 1e-3 * ctx.tol and moved > 1e-4, f"the ablation itself moves logits by {moved:.3g}")]


@torch.no_grad()
def check_head_sum(ctx: DoctorContext) -> list[CheckResult]:
    model = ctx.lm.model
    n_heads, head_dim = attention_head_layout(model)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(layer: int):
        def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[layer] = (args[0].detach(), output.detach())

        return hook

    n = num_layers(model)
    handles = [find_attention_output(model, i).register_forward_hook(make_hook(i)) for i in range(n)]
    try:
        ctx.logits()
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for layer, (x, y) in inputs.items():
        proj = find_attention_output(model, layer)
        if x.shape[-1] != n_heads * head_dim:
            return [make_check("heads add up to the attention output", "max relative |Δ| <= 1e-4", float("inf"), False,
                           f"{n_heads} heads x {head_dim} = {n_heads * head_dim}, but the projection reads {x.shape[-1]}")]
        w = proj.weight.float().view(-1, n_heads, head_dim)
        per_head = torch.einsum("bshd,ohd->bsho", x.float().view(*x.shape[:-1], n_heads, head_dim), w)
        total = per_head.sum(-2) + (proj.bias.float() if proj.bias is not None else 0.0)
        worst = max(worst, float((total - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12)))
    return [make_check("heads add up to the attention output", f"max relative |Δ| <= {1e-4 * ctx.tol:.0e}", worst, worst <= 1e-4 * ctx.tol)]


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def _tensor_digest(t: torch.Tensor, chunk: int = 1 << 24) -> tuple[int, int]:
    """Two integer sums over a tensor's bits (plain and position-weighted), on its own device and
    a slice at a time: exact and order-free (integer addition, wrapping modulo 2**64 where it
    overflows), so an identical tensor always gives the same pair on a GPU too, and a checkpoint
    of billions of weights is never copied whole."""
    bits = t.detach().contiguous().reshape(-1).view(_INT_VIEW[t.element_size()])
    plain = weighted = 0
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].to(torch.int64)
        position = torch.arange(start, start + part.numel(), device=part.device) % 251 + 1
        plain += int(part.sum())
        weighted += int((part * position).sum())
    return plain, weighted


def _instrumentation(model: nn.Module) -> tuple[int, str]:
    """Hooks on every module and a digest of every weight and buffer (and which tensor the LM head
    uses, since orthogonalisation unties it): what an attack must leave as it found it."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict(keep_vars=True).items()):
        digest.update(f"{name}:{tuple(p.shape)}:{_tensor_digest(p)}".encode())
    heads = model.get_output_embeddings()
    digest.update(str(id(heads.weight) if heads is not None else 0).encode())
    return hooks, digest.hexdigest()


AttackFactory = Callable[[LoadedModel, torch.Tensor], AbstractContextManager]


def attack_contexts(lm: LoadedModel) -> dict[str, AttackFactory]:
    """Every hook- or weight-level edit the attacks are made of, on a random direction."""
    found: dict[str, AttackFactory] = {
        "ablate_direction": lambda m, d: ablate_direction(m.model, d),
        "add_vector": lambda m, d: add_vector(m.model, d, [0, -1], 2.0),
        "orthogonalized": lambda m, d: orthogonalized(m.model, d),
        "scale_heads": lambda m, d: scale_heads(m.model, [(0, 0), (-1, 1)], 0.0, keep_norm=True),
    }
    layers = find_moe_layers(lm.model)
    if layers:
        first = layers[0]
        found["scale_expert_routing"] = lambda m, d: scale_expert_routing(m.model, {(first.layer, 0): 0.0})
        found["shift_expert_outputs"] = lambda m, d: shift_expert_outputs(m.model, {(first.layer, 0): d})
    return found


class _Planted(Exception):
    pass


def check_cleanup(ctx: DoctorContext, attacks: dict[str, AttackFactory] | None = None) -> list[CheckResult]:
    model = ctx.lm.model
    before, base = _instrumentation(model), ctx.logits()
    left: list[str] = []
    for name, factory in (attacks or attack_contexts(ctx.lm)).items():
        try:
            with factory(ctx.lm, ctx.direction):
                ctx.logits()
                raise _Planted
        except _Planted:
            pass
        except Exception as exc:  # the attack itself does not run on this model: as bad for a user
            left.append(f"{name} ({type(exc).__name__}: {exc})")
            continue
        if _instrumentation(model) != before or not torch.equal(ctx.logits(), base):
            left.append(name)
    return [make_check("attacks clean up after an exception", "0 attacks leave hooks or edits", len(left), not left,
                   ", ".join(left))]


def check_probe_trace(ctx: DoctorContext) -> list[CheckResult]:
    lm = ctx.lm
    n = num_layers(lm.model)
    worst = 0.0
    sequences = [row[m.bool()].tolist() for row, m in zip(ctx.input_ids.cpu(), ctx.mask.cpu(), strict=True)]
    # The last layer is left out: output_hidden_states gives it after the final norm.
    for layer in sorted({0, n // 2, max(0, n - 2)}):
        probe = RefusalProbe(ctx.direction.clone(), 0.1, ProbeMetadata(layer, model_hidden_size(lm), lm.fingerprint))
        engine = probe_traces(lm, probe, sequences, [(0, len(s)) for s in sequences], batch_size=len(sequences))
        for seq, trace in zip(sequences, engine, strict=True):
            with torch.no_grad():
                out = lm.model(input_ids=torch.tensor([seq], device=lm.device), output_hidden_states=True, use_cache=False)
            naive = probe.scores(out.hidden_states[layer + 1][0]).cpu().numpy()
            worst = max(worst, float(abs(naive - trace).max()))
    return [make_check("engine trace = output_hidden_states", f"max |Δscore| <= {1e-5 * ctx.tol:.0e}", worst, worst <= 1e-5 * ctx.tol)]


def run_doctor(lm: LoadedModel, fmt: ThinkingFormat, *, seed: int = 0,
               attacks: dict[str, AttackFactory] | None = None) -> list[CheckResult]:
    """Every check that applies to the model (MoE checks only where it has experts)."""
    family = family_of(lm.model)
    tok = lm.tokenizer
    opened = check_generation_prompt(tok, fmt)
    if not opened.passed:  # every later check renders this prompt; it would only repeat the error
        return [opened]
    encoded = [tok.encode(render_generation_prompt(tok, p, fmt), add_special_tokens=False) for p in PROMPTS]
    input_ids, mask = pad_batch(encoded, tok.pad_token_id or 0, side="right")
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(model_hidden_size(lm), generator=generator)
    tol = 1.0 if lm.model.dtype == torch.float32 else 64.0
    ctx = DoctorContext(lm, fmt, input_ids.to(lm.device), mask.to(lm.device), direction, tol)
    checks: list[tuple[str, Callable[[DoctorContext], list[CheckResult]]]] = [
        ("chat template", check_template), ("orthogonalisation", check_orthogonalization),
        ("attention heads", check_head_sum), ("attack cleanup", lambda c: check_cleanup(c, attacks)),
        ("probe trace", check_probe_trace)]
    if family.is_moe and find_moe_layers(lm.model):
        checks[2:2] = [("router", check_router), ("experts", check_expert_sum)]
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            results.extend(check(ctx))
        except Exception as exc:  # the adapter does not fit this model: report it as a failed check
            results.append(CheckResult(name, False, None, "runs", f"{type(exc).__name__}: {exc}"))
    return results


def results_json(lm: LoadedModel, results: list[CheckResult]) -> dict[str, object]:
    family = family_of(lm.model)
    return {"model": lm.path, "family": family.name, "fingerprint": lm.fingerprint,
            "passed": all(r.passed for r in results), "checks": [asdict(r) for r in results]}
