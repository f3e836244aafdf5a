"""Finding a model's decoder layers and reading their outputs with hooks.

Hooks are context managers that always remove themselves (``try/finally``), so
an exception inside a scoring batch never leaves a model instrumented.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from probes.families import UnsupportedModelError, family_of, get_path, unwrap_model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ordered list of transformer blocks (the residual stream lives between them)."""
    family = family_of(model)
    layers = get_path(unwrap_model(model), family.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"{family.name} adapter: no decoder layers at {family.layers!r} "
                                    f"in {type(unwrap_model(model)).__name__}")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model))


def _output_tensor(output: object) -> torch.Tensor:
    # Decoder layers return a tensor in transformers 5 and a tuple in older releases.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder layer output type {type(output).__name__}")


@contextmanager
def capture_residual(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream after each of ``layers`` (0-based; -1 = last).

    Yields a dict filled on each forward pass with ``layer -> [batch, seq, hidden]``
    (detached; the latest pass overwrites the previous one).
    """
    blocks = find_decoder_layers(model)
    resolved = sorted({layer % len(blocks) for layer in layers})
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            captured[index] = _output_tensor(output).detach()

        return hook

    try:
        for index in resolved:
            handles.append(blocks[index].register_forward_hook(make_hook(index)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


@contextmanager
def stop_after_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Abort the forward pass right after ``layer``: teacher-forced scoring needs
    nothing above the probe layer, so the remaining layers and the LM head are skipped.
    Callers wrap the forward call in ``try/except StopForward``."""
    blocks = find_decoder_layers(model)

    def hook(_module: nn.Module, _inputs: object, _output: object) -> None:
        raise StopForward

    handle = blocks[layer % len(blocks)].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _child(model: nn.Module, layer: int, name: str, what: str) -> nn.Module:
    block = find_decoder_layers(model)[layer]
    module = get_path(block, name)
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(f"{family_of(model).name} adapter: no {what} {name!r} in {type(block).__name__}")
    return module


def find_attention(model: nn.Module, layer: int) -> nn.Module:
    """Layer ``layer``'s self-attention module (its output is what attention writes to the residual stream)."""
    return _child(model, layer, family_of(model).attention, "attention module")


def find_attention_output(model: nn.Module, layer: int) -> nn.Linear:
    """Layer ``layer``'s linear map from concatenated head outputs to the residual stream."""
    family = family_of(model)
    proj = _child(model, layer, f"{family.attention}.{family.attention_output}", "attention output projection")
    if not isinstance(proj, nn.Linear):
        raise UnsupportedModelError(f"{family.name} adapter: {family.attention_output!r} is a {type(proj).__name__}, not a Linear")
    return proj


def attention_head_layout(model: nn.Module) -> tuple[int, int]:
    """(number of query heads, per-head width of the attention output) from the model's config."""
    family = family_of(model)
    config = unwrap_model(model).config.get_text_config()
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, family.head_dim_key, None) or config.hidden_size // n_heads)
    return n_heads, head_dim


def find_mlp(model: nn.Module, layer: int) -> nn.Module:
    """Layer ``layer``'s MLP, dense or mixture-of-experts."""
    return _child(model, layer, family_of(model).mlp, "MLP module")


def replace_output_tensor(output: object, tensor: torch.Tensor) -> object:
    """``output`` with its hidden-state tensor swapped for ``tensor`` (same container shape)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    raise TypeError(f"unexpected module output type {type(output).__name__}")


def output_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor in a module's output (a tensor, or the first item of a tuple)."""
    return _output_tensor(output)


@contextmanager
def capture_block_inputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream entering each of ``layers`` (``resid_pre``), as
    ``layer -> [batch, seq, hidden]``; the latest pass overwrites the previous one."""
    blocks = find_decoder_layers(model)
    resolved = sorted({layer % len(blocks) for layer in layers})
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden.detach()

        return hook

    try:
        for index in resolved:
            handles.append(blocks[index].register_forward_pre_hook(make_hook(index), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
