"""Tiny random-weight models of every supported family, for the conformance suite.

Each is built from the family's real transformers config class, scaled down
(hidden 64, 3 layers, 8 experts where the family has experts), with a byte-level
BPE tokenizer carrying the family's special tokens and a chat template, written
by us, that reproduces the family's rendered format (``templates/``, sources in each
template's header). They load through ``probes.models.load_model`` like
any real checkpoint. Routers get larger random weights (and random bias terms
where the family has them) than the default initialisation, so routing is
decisive and a routing error shows in the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TEMPLATES = Path(__file__).parent / "templates"
_CORPUS = [
    "The assistant thinks about the request before it answers.",
    "Let me think about what the user is asking for here.",
    "I cannot help with that request, but here is something safer.",
    "Sure, here is a short answer with the steps you asked for.",
    "Reasoning: the question is about chemistry, gardening, travel or code.",
    "Placeholder answer text: one, two, three, four, five.",
]


@dataclass(frozen=True)
class TinyFamily:
    name: str  # the adapter's family name (probes.families)
    config: Callable[[int, dict[str, int]], object]  # (vocab size, special ids) -> config
    template: str
    bos: str | None
    eos: str
    pad: str
    special: tuple[str, ...]
    sliding: bool = False
    # The checkpoint's generation_config.eos_token_id, where it lists several (gpt-oss: <|return|>, <|call|>).
    end_of_turn: tuple[str, ...] = ()


_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
_DEEPSEEK_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
_CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")
_HARMONY = ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
            "<|return|>", "<|call|>", "<|constrain|>")


def _ids(v: int, s: dict[str, int], bos: str | None, eos: str, pad: str) -> dict[str, int | None]:
    return dict(vocab_size=v, bos_token_id=s.get(bos) if bos else None, eos_token_id=s[eos], pad_token_id=s[pad])


TINY_FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily("qwen2", lambda v, s: tf.Qwen2Config(**_COMMON, **_ids(v, s, _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1])),
               "deepseek_r1.jinja", _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS),
    TinyFamily("llama", lambda v, s: tf.LlamaConfig(**_COMMON, **_ids(v, s, _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1])),
               "deepseek_r1.jinja", _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS),
    TinyFamily("qwen3", lambda v, s: tf.Qwen3Config(**_COMMON, head_dim=16, **_ids(v, s, None, "<|im_end|>", "<|endoftext|>")),
               "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", _CHATML),
    TinyFamily("qwen3_moe", lambda v, s: tf.Qwen3MoeConfig(**_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                                           moe_intermediate_size=32, norm_topk_prob=True,
                                                           **_ids(v, s, None, "<|im_end|>", "<|endoftext|>")),
               "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", _CHATML),
    # hidden = intermediate, as in the real gpt-oss (2880): down_proj's orientation cannot be read off its shape.
    TinyFamily("gpt_oss", lambda v, s: tf.GptOssConfig(**{**_COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=8,
                                                       num_experts_per_tok=2, sliding_window=8,
                                                       **_ids(v, s, "<|startoftext|>", "<|return|>", "<|endoftext|>")),
               "harmony.jinja", "<|startoftext|>", "<|return|>", "<|endoftext|>", _HARMONY, sliding=True,
               end_of_turn=("<|return|>", "<|call|>")),
    TinyFamily("mixtral", lambda v, s: tf.MixtralConfig(**_COMMON, num_local_experts=8, num_experts_per_tok=2,
                                                        **_ids(v, s, "<s>", "</s>", "</s>")),
               "mistral_inst.jinja", "<s>", "</s>", "</s>", ("<s>", "</s>")),
    TinyFamily("olmoe", lambda v, s: tf.OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                                    **_ids(v, s, "<|endoftext|>", "<|endoftext|>", "<|padding|>")),
               "tulu.jinja", "<|endoftext|>", "<|endoftext|>", "<|padding|>",
               ("<|endoftext|>", "<|padding|>", "<|system|>", "<|user|>", "<|assistant|>")),
    TinyFamily("phi3", lambda v, s: tf.Phi3Config(**_COMMON, **_ids(v, s, None, "<|im_end|>", "<|endoftext|>")),
               "phi4_reasoning.jinja", None, "<|im_end|>", "<|endoftext|>", (*_CHATML, "<|im_sep|>")),
    TinyFamily("deepseek_v3", lambda v, s: tf.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, head_dim=8, routed_scaling_factor=2.5,
        norm_topk_prob=True, **_ids(v, s, _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1])),
        "deepseek_v31.jinja", _DEEPSEEK_TOKENS[0], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS[1], _DEEPSEEK_TOKENS),
)}


def byte_bpe_tokenizer(special: tuple[str, ...], bos: str | None, eos: str, pad: str,
                       template: str | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer carrying a model's special tokens (and its chat template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    named = {eos, pad, *([bos] if bos else [])}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[t for t in special if t not in named])
    if template is not None:
        fast.chat_template = template
    return fast


def _tokenizer(family: TinyFamily) -> PreTrainedTokenizerFast:
    return byte_bpe_tokenizer(family.special, family.bos, family.eos, family.pad, (TEMPLATES / family.template).read_text())


@torch.no_grad()
def _randomise_routers(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".gate." in name or ".router." in name:
            param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if leaf == "weight" else 0.5))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def build_tiny_family(name: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight model of family ``name`` to ``out`` (safetensors, tokenizer, template)."""
    family = TINY_FAMILIES[name]
    out = Path(out)
    tokenizer = _tokenizer(family)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in family.special}
    config = family.config(len(tokenizer), special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_routers(model, torch.Generator().manual_seed(seed))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ([tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn]
                                            if family.end_of_turn else tokenizer.eos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
