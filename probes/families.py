"""Model-family adapters: the one place that knows a family's module names and
conventions. Everything that touches model internals (layers, attention heads,
residual writers, experts, routers) asks the family of the model in hand.

Each family is one declaration: where the decoder layers live, how attention
heads are laid out, which tensors write into the residual stream and along which
axis, how the experts are stored, how the router chooses experts, and which
thinking format the family's reasoning checkpoints use. An architecture that is
not declared here is refused with the list of supported families; a guess that
picks the wrong ``ModuleList`` or the wrong tensor axis would corrupt every
result without an error.

Adding a family: add a ``ModelFamily`` to ``FAMILIES`` (the ``model_type`` from
the checkpoint's ``config.json``), build a tiny random-weight model of it in
``tests/families`` and run ``curate doctor --model DIR`` on it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from torch import nn

from probes.chat import ThinkingFormat


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class RouterSpec:
    """How a family's router turns logits into (weights, expert indices).

    ``scoring``: ``softmax`` (probabilities over all experts, then top-k),
    ``topk_softmax`` (top-k on the raw logits, softmax over the k chosen: gpt-oss)
    or ``sigmoid`` (independent scores, grouped top-k with a selection-only
    bias: DeepSeek-V3).
    ``renormalize``: ``"always"``, ``"never"`` or the router attribute that says
    (``norm_topk_prob``).
    """

    scoring: Literal["softmax", "topk_softmax", "sigmoid"]
    renormalize: str = "never"
    selection_bias: str | None = None  # router buffer added to scores for choosing only
    groups: tuple[str, str] | None = None  # router attributes (number of groups, groups kept)
    scaling_factor: str | None = None  # router attribute multiplying the final weights
    keep_float32: bool = False  # weights stay float32 instead of the logits' dtype


@dataclass(frozen=True)
class ExpertSpec:
    """Fused expert tensors of one MoE block.

    ``down_layout``: ``"hidden_in"`` when ``down_proj`` is ``[experts, hidden,
    intermediate]`` (applied as ``F.linear``) or ``"in_hidden"`` when it is
    ``[experts, intermediate, hidden]`` (applied as ``x @ W``: gpt-oss). The two
    cannot be told apart by shape when hidden = intermediate, so it is declared.
    """

    router: str = "gate"
    experts: str = "experts"
    down: str = "down_proj"
    down_layout: Literal["hidden_in", "in_hidden"] = "hidden_in"
    down_bias: str | None = None  # [experts, hidden]: writes into the residual stream too
    shared: str | None = None  # a dense MLP every token also goes through (DeepSeek-V3)
    index_arg: str = "top_k_index"  # keyword names of the experts module's forward
    weight_arg: str = "top_k_weights"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    checkpoints: str  # real reasoning checkpoints of this family, for the README and errors
    thinking: ThinkingFormat = field(default_factory=ThinkingFormat)
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_output: str = "o_proj"
    head_dim_key: str = "head_dim"  # config key of the per-head width of the attention output
    mlp: str = "mlp"
    dense_down: str = "down_proj"  # a dense MLP's projection into the residual stream
    router: RouterSpec | None = None
    experts: ExpertSpec | None = None
    # Recommended sampling from the model card: (temperature, top_p); None means greedy is fine.
    sampling: tuple[float, float] | None = None

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


_THINK = ThinkingFormat()
# Harmony (gpt-oss): the reasoning is the analysis channel; the final channel is the answer.
HARMONY = ThinkingFormat(
    open_marker="<|channel|>analysis<|message|>",
    close_marker="<|end|>",
    after_open="",
    before_close="",
    after_close="<|start|>assistant<|channel|>final<|message|>",
    template_kwargs={"reasoning_effort": "medium"},
    renderer="openai-harmony",
)
_SOFTMAX_NORM = RouterSpec("softmax", renormalize="norm_topk_prob")

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("qwen2", ("qwen2",), "DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B", sampling=(0.6, 0.95)),
        ModelFamily("llama", ("llama",), "DeepSeek-R1-Distill-Llama-8B/70B", sampling=(0.6, 0.95)),
        ModelFamily("qwen3", ("qwen3",), "Qwen3-0.6B … 32B (thinking mode)",
                    thinking=ThinkingFormat(template_kwargs={"enable_thinking": True}), sampling=(0.6, 0.95)),
        ModelFamily("qwen3_moe", ("qwen3_moe",), "Qwen3-30B-A3B, Qwen3-235B-A22B (thinking mode)",
                    thinking=ThinkingFormat(template_kwargs={"enable_thinking": True}), sampling=(0.6, 0.95),
                    router=_SOFTMAX_NORM, experts=ExpertSpec()),
        ModelFamily("gpt_oss", ("gpt_oss",), "gpt-oss-20b, gpt-oss-120b (harmony format)", thinking=HARMONY,
                    sampling=(1.0, 1.0), router=RouterSpec("topk_softmax"),
                    experts=ExpertSpec(router="router", down_layout="in_hidden", down_bias="down_proj_bias",
                                       index_arg="router_indices", weight_arg="routing_weights")),
        ModelFamily("mixtral", ("mixtral",), "Mixtral-8x7B/8x22B-Instruct (no native thinking: markers appended)",
                    router=RouterSpec("softmax", renormalize="always", keep_float32=True), experts=ExpertSpec()),
        ModelFamily("olmoe", ("olmoe",), "OLMoE-1B-7B-Instruct (no native thinking: markers appended)",
                    router=_SOFTMAX_NORM, experts=ExpertSpec()),
        ModelFamily("phi3", ("phi3",), "Phi-4-reasoning, Phi-4-reasoning-plus, Phi-4-mini-reasoning",
                    sampling=(0.8, 0.95)),
        # DeepSeek-V3.1's template opens thinking only with thinking=True (without it the generation
        # prompt ends in </think>); R1's template ignores the argument and always opens it.
        ModelFamily("deepseek_v3", ("deepseek_v3",), "DeepSeek-R1, DeepSeek-V3.1 (MLA, shared experts, grouped routing)",
                    thinking=ThinkingFormat(template_kwargs={"thinking": True}),
                    head_dim_key="v_head_dim", sampling=(0.6, 0.95),
                    router=RouterSpec("sigmoid", renormalize="norm_topk_prob", selection_bias="e_score_correction_bias",
                                      groups=("num_group", "topk_group"), scaling_factor="routed_scaling_factor",
                                      keep_float32=True),
                    experts=ExpertSpec(shared="shared_experts")),
    )
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def unwrap_model(model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel -> the transformers model. Only PEFT's own wrappers are
    # unwrapped: PEFT also sets ``peft_config`` on the transformers model it wraps.
    while type(model).__module__.startswith("peft.") and hasattr(model, "base_model"):
        inner = model.base_model
        if inner is model:
            break
        model = inner.model if type(inner).__module__.startswith("peft.") and hasattr(inner, "model") else inner
    return model


def peft_base_layer(module: nn.Module) -> nn.Module:
    """The module a PEFT layer wrapper stands in for (``lora.Linear``, or ``ParamWrapper`` around a
    fused experts module, nested once per targeted parameter); the module itself otherwise. On a
    model being trained, the wrappers are what runs; their weights and shapes live underneath."""
    while type(module).__module__.startswith("peft.") and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def family_for_model_type(model_type: str) -> ModelFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
        "To add one, declare a ModelFamily in probes/families.py and check it with `curate doctor --model DIR`"
    )


def family_for_architecture(architecture: str) -> ModelFamily:
    """The family of a transformers class name (``Qwen3MoeForCausalLM`` -> qwen3_moe), as recipes name it."""
    stem = architecture.removesuffix("ForCausalLM").lower()
    for family in FAMILIES.values():
        if any(t.replace("_", "") == stem for t in family.model_types):
            return family
    raise UnsupportedModelError(f"no adapter for architecture {architecture!r}; supported: {', '.join(supported_model_types())}")


def family_for_dir(path: str | Path) -> ModelFamily:
    """The family of a model directory, from its ``config.json`` alone (no weights read)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    config = json.loads(config_file.read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = text.get("model_type") or config.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{config_file} names no model_type")
    return family_for_model_type(model_type)


# model -> family, set by use_family (doctor --adapter, fault injection); weak, so a model that is
# freed takes its override with it and a later model can never inherit it.
_OVERRIDE: weakref.WeakKeyDictionary[nn.Module, ModelFamily] = weakref.WeakKeyDictionary()


def family_of(model: nn.Module) -> ModelFamily:
    """The adapter for ``model`` (a transformers model, possibly PEFT-wrapped)."""
    base = unwrap_model(model)
    if base in _OVERRIDE:
        return _OVERRIDE[base]
    config = getattr(base, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(base).__name__} has no config; not a transformers model")
    text_config = config.get_text_config()
    return family_for_model_type(str(getattr(text_config, "model_type", None) or config.model_type))


def use_family(model: nn.Module, family: ModelFamily | None) -> None:
    """Make ``model`` use ``family`` instead of its declared one (None restores it).
    For checking an adapter under development, or that a wrong one is caught."""
    base = unwrap_model(model)
    if family is None:
        _OVERRIDE.pop(base, None)
    else:
        _OVERRIDE[base] = family


def override_family(family: ModelFamily, changes: dict[str, Any]) -> ModelFamily:
    """``family`` with some declarations replaced (``{"experts": {"down_layout": "hidden_in"}}``):
    for trying an adapter on a new checkpoint with ``curate doctor --adapter``."""
    nested = {"experts": ExpertSpec, "router": RouterSpec, "thinking": ThinkingFormat}
    updates: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in {f.name for f in fields(ModelFamily)}:
            raise ValueError(f"--adapter: {key!r} is not a family declaration ({', '.join(f.name for f in fields(ModelFamily))})")
        if key in nested and isinstance(value, dict):
            current = getattr(family, key)
            known = {f.name for f in fields(nested[key])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"--adapter: {key}.{unknown[0]} is not one of {', '.join(sorted(known))}")
            value = replace(current, **value) if current is not None else nested[key](**value)
        updates[key] = tuple(value) if isinstance(value, list) else value
    return replace(family, **updates)


def get_path(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
