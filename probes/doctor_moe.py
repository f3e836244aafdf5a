"""Conformance checks of a mixture-of-experts model's routing and experts (see ``probes.doctor``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from probes.doctor_base import CheckResult, DoctorContext, make_check
from probes.experts import MoeLayer, find_moe_layers, route, scale_expert_routing, single_expert_output


def _expert_inputs(ctx: DoctorContext) -> Iterator[tuple[MoeLayer, torch.Tensor, torch.Tensor]]:
    """(MoE layer, its input tokens, its output) for every MoE layer, from one forward pass."""
    layers = find_moe_layers(ctx.lm.model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(layer: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            seen[layer] = (x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1]))

        return hook

    handles = [m.mlp.register_forward_hook(make_hook(m.layer), with_kwargs=True) for m in layers]
    try:
        ctx.logits()
    finally:
        for h in handles:
            h.remove()
    for m in layers:
        yield m, *seen[m.layer]


def check_router(ctx: DoctorContext) -> list[CheckResult]:
    layers = find_moe_layers(ctx.lm.model)
    base = ctx.logits()
    with scale_expert_routing(ctx.lm.model, {(m.layer, e): 1.0 for m in layers for e in range(m.num_experts)}):
        same = ctx.logits()
    identity = float((same - base).abs().max())
    routed: dict[int, torch.Tensor] = {}

    def make_hook(layer: int, spec):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            routed[layer] = args[1] if len(args) > 1 else kwargs[spec.index_arg]

        return hook

    def counts() -> dict[int, torch.Tensor]:
        handles = [m.experts.register_forward_pre_hook(make_hook(m.layer, m.spec), with_kwargs=True) for m in layers]
        try:
            ctx.logits()
        finally:
            for h in handles:
                h.remove()
        return {m.layer: torch.bincount(routed[m.layer].flatten(), minlength=m.num_experts) for m in layers}

    before = counts()
    busiest = {m.layer: int(before[m.layer].argmax()) for m in layers}
    with scale_expert_routing(ctx.lm.model, {(layer, e): 0.0 for layer, e in busiest.items()}):
        after = counts()
    leaked = sum(int(after[layer][e]) for layer, e in busiest.items())
    had = sum(int(before[layer][e]) for layer, e in busiest.items())
    return [
        make_check("router edit at scale 1 is the identity", "max |Δlogit| <= 1e-5", identity, identity <= 1e-5),
        make_check("masked expert receives no tokens", "0 tokens (it had some unmasked)", leaked, leaked == 0 and had > 0,
               f"{had} tokens before the mask"),
    ]


@torch.no_grad()
def check_expert_sum(ctx: DoctorContext) -> list[CheckResult]:
    worst = 0.0
    with torch.no_grad():
        for moe, x, y in _expert_inputs(ctx):
            logits = moe.router(x)[0]
            weights, indices = route(moe, logits)
            total = torch.zeros_like(x, dtype=torch.float32)
            for e in range(moe.num_experts):
                w = (weights * (indices == e)).sum(-1, keepdim=True).float()
                if bool((w != 0).any()):
                    total += w * single_expert_output(moe, x, e).float()
            if moe.shared is not None:
                total += moe.shared(x).float()
            worst = max(worst, float((total - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12)))
    return [make_check("experts add up to the MoE block", f"max relative |Δ| <= {1e-4 * ctx.tol:.0e}", worst, worst <= 1e-4 * ctx.tol)]
