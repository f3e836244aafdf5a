"""Mixture-of-Experts internals: finding routers and experts, routing
statistics, and editing individual experts (the expert-aware attacks).

Two expert layouts are handled:
- **fused** (transformers 5: ``Qwen3MoeExperts``, ``Qwen2MoeExperts``,
  ``MixtralExperts``, ``OlmoeExperts`` and the other ``@use_experts_implementation``
  classes): one module holding 3-D ``gate_up_proj``/``down_proj`` tensors,
  called as ``experts(hidden, top_k_index, top_k_weights)``. One expert's
  output is obtained by calling the module with every token routed to that
  expert alone at weight 1, so whatever kernel the model uses computes it.
- **module list** (transformers 4.x and many remote-code models): ``experts``
  is an ``nn.ModuleList`` of MLPs; each expert's output is hooked directly.

Routers are either a top-k router module returning ``(logits, weights,
indices)`` (transformers 5) or a plain ``nn.Linear`` producing logits that the
block turns into top-k weights itself. Re-routing works on logits in both
cases, so a masked expert's tokens go to the next-best expert.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from probes.batching import pad_batch
from probes.capture import find_decoder_layers, find_mlp, unwrap_model
from probes.chat import ThinkingFormat, render_generation_prompt
from probes.models import LoadedModel

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class MoeLayer:
    layer: int
    router: nn.Module
    experts: nn.Module
    fused: bool
    num_experts: int
    top_k: int


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every decoder layer whose MLP is a routed mixture of experts (empty for dense models)."""
    config = unwrap_model(model).config.get_text_config()
    default_top_k = int(getattr(config, "num_experts_per_tok", 0) or getattr(config, "num_selected_experts", 0) or 0)
    found = []
    for index, block in enumerate(find_decoder_layers(model)):
        try:
            mlp = find_mlp(block)
        except ValueError:
            continue
        router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        experts = getattr(mlp, "experts", None)
        if router is None or experts is None:
            continue
        if isinstance(experts, nn.ModuleList):
            fused, n = False, len(experts)
        elif isinstance(getattr(experts, "down_proj", None), torch.Tensor) and experts.down_proj.dim() == 3:
            fused, n = True, int(experts.down_proj.shape[0])
        else:
            raise ValueError(f"layer {index}: unsupported experts layout {type(experts).__name__}")
        top_k = int(getattr(router, "top_k", 0) or getattr(mlp, "top_k", 0) or default_top_k)
        if top_k <= 0:
            raise ValueError(f"layer {index}: cannot tell how many experts each token uses")
        found.append(MoeLayer(index, router, experts, fused, n, top_k))
    return found


def _router_topk(moe: MoeLayer, output: object) -> torch.Tensor:
    """``[tokens, top_k]`` expert indices from a router's output."""
    if isinstance(output, tuple) and len(output) == 3:
        return output[2]
    logits = output[0] if isinstance(output, tuple) else output
    return torch.topk(logits, moe.top_k, dim=-1).indices


@torch.no_grad()
def routing_frequencies(
    lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat, *, batch_size: int = 16
) -> torch.Tensor:
    """Share of prompt tokens routed to each expert: ``[n_moe_layers, n_experts]``
    (each row sums to ``top_k``; padding is left out)."""
    layers = find_moe_layers(lm.model)
    if not layers:
        raise ValueError("the model has no mixture-of-experts layers")
    counts = torch.zeros(len(layers), max(m.num_experts for m in layers), dtype=torch.float64)
    tokens = 0
    current_mask: list[torch.Tensor] = []
    handles = []

    def make_hook(row: int, moe: MoeLayer):
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            chosen = _router_topk(moe, output)[current_mask[0]]
            counts[row] += torch.bincount(chosen.flatten().cpu(), minlength=counts.shape[1]).double()

        return hook

    pad = lm.tokenizer.pad_token_id or 0
    encoded = [lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, p, fmt), add_special_tokens=False) for p in prompts]
    try:
        for row, moe in enumerate(layers):
            handles.append(moe.router.register_forward_hook(make_hook(row, moe)))
        for start in range(0, len(encoded), batch_size):
            input_ids, mask = pad_batch(encoded[start : start + batch_size], pad, side="right")
            current_mask[:] = [mask.flatten().bool().to(lm.device)]
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (counts / max(tokens, 1)).float()


def _single_expert_output(moe: MoeLayer, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output for every row of ``hidden`` ([tokens, hidden_size])."""
    if not moe.fused:
        return moe.experts[expert](hidden)
    index = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
    weights = torch.ones((hidden.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
    return moe.experts.forward(hidden, index, weights)  # .forward: skip this module's own hooks


@torch.no_grad()
def expert_output_means(
    lm: LoadedModel, prompts: Sequence[str], fmt: ThinkingFormat, n_positions: int, *, batch_size: int = 16
) -> torch.Tensor:
    """Mean output of every expert at the last ``n_positions`` prompt tokens, whether
    or not the router chose it there: ``[n_moe_layers, n_experts, hidden]``."""
    layers = find_moe_layers(lm.model)
    hidden_size = int(unwrap_model(lm.model).config.get_text_config().hidden_size)
    total = torch.zeros(len(layers), max(m.num_experts for m in layers), hidden_size, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(row: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[row] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    pad = lm.tokenizer.pad_token_id or 0
    encoded = [lm.tokenizer.encode(render_generation_prompt(lm.tokenizer, p, fmt), add_special_tokens=False) for p in prompts]
    try:
        for row, moe in enumerate(layers):
            handles.append(find_mlp(find_decoder_layers(lm.model)[moe.layer]).register_forward_pre_hook(make_hook(row), with_kwargs=True))
        for start in range(0, len(encoded), batch_size):
            input_ids, mask = pad_batch(encoded[start : start + batch_size], pad, side="left")
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device),
                     position_ids=positions.to(lm.device), use_cache=False)
            for row, moe in enumerate(layers):
                tail = inputs[row][:, -n_positions:, :].reshape(-1, inputs[row].shape[-1])
                for e in range(moe.num_experts):
                    total[row, e] += _single_expert_output(moe, tail, e).double().sum(0).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return (total / (len(encoded) * n_positions)).float()


@contextmanager
def scale_expert_routing(model: nn.Module, scales: Mapping[ExpertKey, float]) -> Iterator[None]:
    """Multiply chosen experts' router probabilities by ``scale`` before top-k
    (adds ``log scale`` to their logits); scale 0 masks the expert, so its tokens
    go to the next-best experts. Keys use decoder-layer indices."""
    by_layer = {m.layer: m for m in find_moe_layers(model)}
    unknown = [k for k in scales if k[0] not in by_layer or not 0 <= k[1] < by_layer[k[0]].num_experts]
    if unknown:
        raise ValueError(f"no such (layer, expert) in this model: {unknown}")
    handles = []

    def make_hook(moe: MoeLayer, bias: torch.Tensor):
        def hook(module: nn.Module, _args: object, output: object) -> object:
            if isinstance(output, tuple) and len(output) == 3:
                logits = output[0] + bias.to(output[0].device, output[0].dtype)
                probs = F.softmax(logits, dim=-1, dtype=torch.float)
                top_value, top_index = torch.topk(probs, moe.top_k, dim=-1)
                if getattr(module, "norm_topk_prob", False):
                    top_value = top_value / top_value.sum(dim=-1, keepdim=True)
                return logits, top_value.to(logits.dtype), top_index
            logits = output[0] if isinstance(output, tuple) else output
            edited = logits + bias.to(logits.device, logits.dtype)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    try:
        for layer in sorted({k[0] for k in scales}):
            moe = by_layer[layer]
            bias = torch.zeros(moe.num_experts)
            for (lyr, e), scale in scales.items():
                if lyr == layer:
                    bias[e] = math.log(scale) if scale > 0 else -1e9  # finite: softmax stays defined
            handles.append(moe.router.register_forward_hook(make_hook(moe, bias)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def shift_expert_outputs(model: nn.Module, shifts: Mapping[ExpertKey, torch.Tensor]) -> Iterator[None]:
    """Add ``shifts[(layer, e)]`` to expert ``e``'s output wherever the router uses
    it (scaled by its routing weight, exactly as if the expert had produced it)."""
    by_layer = {m.layer: m for m in find_moe_layers(model)}
    handles = []

    def fused_hook(moe: MoeLayer, layer_shifts: dict[int, torch.Tensor]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            out = output
            for e, shift in layer_shifts.items():
                w = (weights * (index == e)).sum(-1, keepdim=True)  # [tokens, 1], 0 where not routed
                out = out + w.to(out.dtype) * shift.to(out.device, out.dtype)
            return out

        return hook

    def list_hook(shift: torch.Tensor):
        def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
            return output + shift.to(output.device, output.dtype)

        return hook

    try:
        for layer in sorted({k[0] for k in shifts}):
            if layer not in by_layer:
                raise ValueError(f"layer {layer} has no mixture of experts")
            moe = by_layer[layer]
            layer_shifts = {e: v.float() for (lyr, e), v in shifts.items() if lyr == layer}
            if moe.fused:
                handles.append(moe.experts.register_forward_hook(fused_hook(moe, layer_shifts), with_kwargs=True))
            else:
                for e, shift in layer_shifts.items():
                    handles.append(moe.experts[e].register_forward_hook(list_hook(shift)))
        yield
    finally:
        for handle in handles:
            handle.remove()
