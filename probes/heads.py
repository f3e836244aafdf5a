"""Refusal-suppression attention heads.

Attribution: at the cliff position (the last token of the close marker, where
``I′`` is read) each head's output is taken through the layer's output
projection alone (every other head zeroed): ``Δh = W_O[:, head] · o_head``.
Its score is the projection on the probe direction without the sigmoid,
``s = wᵀ·Δh / ‖w‖``. The probe's bias is left out: it is one constant for the
whole model and belongs to no head. Only heads at or below the probe layer can
write into the residual stream the probe reads, so only they are scored; this
is their direct effect (paths through later layers are not followed). Heads
whose average score is most negative push the model away from refusal: the
suppression heads.

Ablation scales chosen heads' outputs by ``gamma`` (0 removes them) at every
position, optionally rescaling the attention output back to its original norm
per token (as the source paper's code does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from probes.capture import attention_head_layout, find_attention_output, find_decoder_layers, num_layers
from probes.forward import batched_residuals
from probes.models import LoadedModel
from probes.refusal import RefusalProbe

Head = tuple[int, int]  # (layer, head)


@torch.no_grad()
def head_contributions(
    lm: LoadedModel,
    probe: RefusalProbe,
    sequences: Sequence[list[int]],
    positions: Sequence[int],
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Mean ``s`` per head over the sequences: ``[probe layer + 1, n_heads]``.

    ``positions[i]`` is the index in ``sequences[i]`` to read (sequences are
    right-padded in the batch, so the index needs no padding offset).
    """
    n_heads, head_dim = attention_head_layout(lm.model)
    last = probe.layer % num_layers(lm.model)
    w = probe.weight.to(lm.device, torch.float32)
    w = w / w.norm()
    # u_l = W_Oᵀ w per layer, so that s_head = Σ_j o[head, j] · u[head, j].
    readout = [find_attention_output(lm.model, layer).weight.float().T @ w for layer in range(last + 1)]
    inputs: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[layer] = args[0].detach()

        return hook

    handles = [find_attention_output(lm.model, layer).register_forward_pre_hook(make_hook(layer)) for layer in range(last + 1)]
    totals = torch.zeros(last + 1, n_heads, dtype=torch.float64)
    try:
        for idx, _ in batched_residuals(lm, sequences, [last], batch_size):
            rows = torch.arange(len(idx), device=lm.device)
            cols = torch.tensor([positions[i] for i in idx], device=lm.device)
            for layer in range(last + 1):
                o = inputs[layer][rows, cols].float()  # [batch, n_heads * head_dim]
                s = (o * readout[layer]).view(len(idx), n_heads, head_dim).sum(-1)
                totals[layer] += s.sum(0).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(len(sequences), 1)).numpy()


def rank_heads(contributions: np.ndarray) -> list[Head]:
    """Heads from most negative (strongest suppression) to most positive."""
    order = np.argsort(contributions, axis=None, kind="stable")
    return [(int(i // contributions.shape[1]), int(i % contributions.shape[1])) for i in order]


def _head_mask(heads: Iterable[int], n_heads: int, head_dim: int, gamma: float, like: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n_heads, head_dim, dtype=like.dtype, device=like.device)
    for h in heads:
        mask[h] = gamma
    return mask.reshape(-1)


@contextmanager
def scale_heads(model: nn.Module, heads: Iterable[Head], gamma: float = 0.0, keep_norm: bool = False) -> Iterator[None]:
    """Scale the chosen heads' outputs by ``gamma`` at every position while inside.

    With ``keep_norm`` each token's attention output is rescaled to the norm it
    had before the heads were scaled. Hooks are removed on exit, always.
    """
    blocks = find_decoder_layers(model)
    n_heads, head_dim = attention_head_layout(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has {n_heads} heads")
        by_layer.setdefault(layer % len(blocks), []).append(head)

    def make_hook(layer_heads: list[int]):
        def hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            scaled = F.linear(x * _head_mask(layer_heads, n_heads, head_dim, gamma, x), module.weight, module.bias)
            if keep_norm:
                scaled = scaled * (output.norm(dim=-1, keepdim=True) / scaled.norm(dim=-1, keepdim=True).clamp_min(1e-6))
            return scaled

        return hook

    handles = []
    try:
        for layer, layer_heads in by_layer.items():
            handles.append(find_attention_output(model, layer).register_forward_hook(make_hook(layer_heads)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def scale_heads_in_weights(model: nn.Module, heads: Iterable[Head], gamma: float = 0.0) -> None:
    """The same edit made permanent: scale the heads' columns of ``W_O``
    (``keep_norm`` has no weight-space equivalent)."""
    blocks = find_decoder_layers(model)
    _, head_dim = attention_head_layout(model)
    for layer, head in heads:
        proj = find_attention_output(model, layer % len(blocks))
        proj.weight[:, head * head_dim : (head + 1) * head_dim] *= gamma
