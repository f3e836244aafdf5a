"""Finding a model's decoder layers and reading their outputs with hooks.

Hooks are context managers that always remove themselves (``try/finally``), so
an exception inside a scoring batch never leaves a model instrumented.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# Attribute paths to the decoder-layer list in common architectures, tried in
# order; PEFT wrappers add ``base_model.model`` in front, handled by unwrapping.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel -> the transformers model.
    while hasattr(model, "base_model") and model.base_model is not model and hasattr(model, "peft_config"):
        model = model.base_model
        if hasattr(model, "model"):
            model = model.model
    return model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ordered list of transformer blocks (the residual stream lives between them)."""
    base = unwrap_model(model)
    for path in _LAYER_PATHS:
        obj: object = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    # Fallback: the longest ModuleList whose members share one class.
    best: nn.ModuleList | None = None
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"cannot find decoder layers in {type(base).__name__}")
    return best


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


# Attribute names of a block's attention module and of its output projection.
_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj")


def find_attention_output(block: nn.Module) -> nn.Linear:
    """The linear map from concatenated head outputs to the residual stream."""
    for attn_name in _ATTN_NAMES:
        attn = getattr(block, attn_name, None)
        if attn is None:
            continue
        for proj_name in _OUT_PROJ_NAMES:
            proj = getattr(attn, proj_name, None)
            if isinstance(proj, nn.Linear):
                return proj
    raise ValueError(f"cannot find the attention output projection in {type(block).__name__}")


def attention_head_layout(model: nn.Module) -> tuple[int, int]:
    """(number of query heads, head dimension) from the model's config."""
    config = unwrap_model(model).config.get_text_config()
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return n_heads, head_dim


_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")


def _child(block: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the {what} in {type(block).__name__}")


def find_attention(block: nn.Module) -> nn.Module:
    """A block's self-attention module (its output is what attention writes to the residual stream)."""
    return _child(block, _ATTN_NAMES, "attention module")


def find_mlp(block: nn.Module) -> nn.Module:
    """A block's MLP, dense or mixture-of-experts."""
    return _child(block, _MLP_NAMES, "MLP module")


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
