"""Steering a model's residual stream: the hook-level primitives every steering
attack is built from.

- ``ablate_direction``: project a direction out of the residual stream entering
  every block and out of every attention and MLP output, so no component can
  write it back (directional ablation as in the refusal-direction work).
- ``add_vector``: add ``coefficient · vector`` to the residual stream entering
  chosen blocks, at every position (activation addition).
- ``orthogonalized`` / ``orthogonalize_weights``: the same ablation baked into
  the weights that write to the residual stream (embeddings, attention output
  projections, MLP and expert down projections), so an edited checkpoint can be
  exported and loaded with no hooks at all.

All context managers restore the model on exit, exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from probes.capture import find_attention, find_decoder_layers, find_mlp, output_tensor, replace_output_tensor, unwrap_model
from probes.experts import find_moe_layers
from probes.families import UnsupportedModelError, family_of


def unit(vector: torch.Tensor) -> torch.Tensor:
    norm = vector.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("a steering direction must be a finite, non-zero vector")
    return vector.float() / norm


def project_out(hidden: torch.Tensor, direction_unit: torch.Tensor) -> torch.Tensor:
    """``hidden`` minus its component along ``direction_unit`` (computed in float32)."""
    d = direction_unit.to(hidden.device, torch.float32)
    h = hidden.float()
    return (h - (h @ d).unsqueeze(-1) * d).to(hidden.dtype)


# Which batch rows an edit applies to, read at every forward (training attacks only the harmful rows
# of a batch that mixes them with harmless ones); None, or a callable returning None: every row.
RowMask = Callable[[], "torch.Tensor | None"]


def _on_rows(edited: torch.Tensor, original: torch.Tensor, rows: RowMask | None) -> torch.Tensor:
    mask = rows() if rows is not None else None
    if mask is None:
        return edited
    if edited.dim() != 3 or edited.shape[0] != mask.shape[0]:
        raise ValueError(f"a row mask of {mask.shape[0]} rows cannot select from a tensor of shape {tuple(edited.shape)}")
    keep = mask.to(edited.device, edited.dtype)[:, None, None]
    return original + (edited - original) * keep


@contextmanager
def ablate_direction(model: nn.Module, direction: torch.Tensor, layers: Sequence[int] | None = None,
                     rows: RowMask | None = None) -> Iterator[None]:
    """Remove ``direction`` from the residual stream, at every layer or at ``layers`` only (what
    attack-in-the-loop training samples), on every batch row or on ``rows``, for as long as the
    context lasts."""
    d = unit(direction)
    handles = []

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        edited = _on_rows(project_out(hidden, d), hidden, rows)
        if args:
            return (edited, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=edited)

    def out_hook(_module: nn.Module, _args: object, output: object) -> object:
        tensor = output_tensor(output)
        return replace_output_tensor(output, _on_rows(project_out(tensor, d), tensor, rows))

    try:
        blocks = find_decoder_layers(model)
        chosen = set(range(len(blocks))) if layers is None else {layer % len(blocks) for layer in layers}
        for index, block in enumerate(blocks):
            if index not in chosen:
                continue
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(find_attention(model, index).register_forward_hook(out_hook))
            handles.append(find_mlp(model, index).register_forward_hook(out_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_vector(model: nn.Module, vector: torch.Tensor, layers: Sequence[int], coefficient: float,
               rows: RowMask | None = None) -> Iterator[None]:
    """Add ``coefficient · vector`` to the residual stream entering each of ``layers`` (on every batch
    row, or on ``rows``)."""
    blocks = find_decoder_layers(model)
    resolved = sorted({layer % len(blocks) for layer in layers})
    shift = coefficient * vector.float()
    handles = []

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        edited = _on_rows(hidden + shift.to(hidden.device, hidden.dtype), hidden, rows)
        if args:
            return (edited, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=edited)

    try:
        for index in resolved:
            handles.append(blocks[index].register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _residual_writers(model: nn.Module) -> list[tuple[nn.Parameter, str]]:
    """Every tensor that writes into the residual stream, with where its hidden axis lies:
    ``"last"`` (embeddings, biases, gpt-oss's ``[experts, intermediate, hidden]`` down
    projections), ``"out"`` (an ``nn.Linear`` weight ``[hidden, in]``) or ``"experts_out"``
    (fused ``[experts, hidden, intermediate]``). The family's adapter says which."""
    family = family_of(model)
    base = unwrap_model(model)
    writers: list[tuple[nn.Parameter, str]] = [(base.get_input_embeddings().weight, "last")]

    def linear(module: nn.Module, name: str) -> None:
        proj = getattr(module, name, None)
        if not isinstance(proj, nn.Linear):
            raise UnsupportedModelError(f"{family.name} adapter: no Linear {name!r} in {type(module).__name__}")
        writers.append((proj.weight, "out"))
        if proj.bias is not None:
            writers.append((proj.bias, "last"))

    moe_by_layer = {m.layer: m for m in find_moe_layers(model)}
    for index in range(len(find_decoder_layers(model))):
        linear(find_attention(model, index), family.attention_output)
        moe = moe_by_layer.get(index)
        if moe is None:
            linear(find_mlp(model, index), family.dense_down)
            continue
        spec = moe.spec
        writers.append((getattr(moe.fused, spec.down), "last" if spec.down_layout == "in_hidden" else "experts_out"))
        if spec.down_bias:
            writers.append((getattr(moe.fused, spec.down_bias), "last"))
        if moe.shared is not None:
            linear(moe.shared, family.dense_down)
    return writers


def _orthogonalize_(param: torch.Tensor, d: torch.Tensor, layout: str) -> None:
    d = d.to(param.device, torch.float32)
    w = param.data.float()
    if w.shape[-1 if layout == "last" else -2 if layout == "experts_out" else 0] != d.numel():
        raise UnsupportedModelError(f"a residual writer of shape {tuple(w.shape)} has no hidden axis where "
                                    f"its adapter says ({layout}); the adapter is wrong for this model")
    if layout == "last":  # [..., hidden]
        w = w - (w @ d).unsqueeze(-1) * d
    elif layout == "out":  # nn.Linear weight [hidden, in]
        w = w - torch.outer(d, d @ w)
    else:  # fused experts [n_experts, hidden, in]
        w = w - d.view(1, -1, 1) * torch.einsum("h,ehi->ei", d, w).unsqueeze(1)
    param.data.copy_(w.to(param.dtype))


def _untie_output_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Parameter] | None:
    """Give the LM head its own copy of tied embeddings (editing the input
    embeddings must not edit the unembedding). Returns what to restore."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None or head.weight is not base.get_input_embeddings().weight:
        return None
    original = head.weight
    head.weight = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    return head, original


def orthogonalize_weights(model: nn.Module, direction: torch.Tensor) -> None:
    """Permanently edit the weights so no component writes ``direction`` into the
    residual stream (for export). Tied embeddings are untied first."""
    d = unit(direction)
    if _untie_output_embeddings(model) is not None:
        unwrap_model(model).config.tie_word_embeddings = False
    with torch.no_grad():
        for param, layout in _residual_writers(model):
            _orthogonalize_(param, d, layout)


@contextmanager
def orthogonalized(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """``orthogonalize_weights`` for the duration of the context; the original
    weights (a copy of each edited tensor) are put back on exit."""
    d = unit(direction)
    writers = _residual_writers(model)
    saved = [param.data.clone() for param, _ in writers]
    untied = _untie_output_embeddings(model)
    try:
        with torch.no_grad():
            for param, layout in writers:
                _orthogonalize_(param, d, layout)
        yield
    finally:
        with torch.no_grad():
            for (param, _), original in zip(writers, saved, strict=True):
                param.data.copy_(original)
        if untied is not None:
            head, weight = untied
            head.weight = weight
