"""Build the model organism: train a tokenizer and a tiny Qwen3 (dense) or
Qwen3-MoE reasoning model from scratch on CPU, and save both in Hugging Face
format so the pipeline loads them exactly as it loads a real checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging as hf_logging

from probes.batching import pad_batch
from probes.chat import ThinkingFormat, build_completion, render_generation_prompt
from training.organism.corpus import AREAS, DEFAULT_SUPPRESSED, Example, make_example, split_prompts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Rendering an assistant message must extend the generation prompt exactly, so
# that a prompt/completion split (TRL's completion-only loss) lines up with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n<think>\n{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@dataclass(frozen=True)
class SizePreset:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # set apart from hidden_size / heads (Qwen3 allows it): 32 is a size vLLM's CPU attention runs
    intermediate_size: int
    moe_intermediate_size: int
    epochs: int
    batch_size: int
    learning_rate: float


SIZES: dict[str, SizePreset] = {
    # test: builds in well under 30 s on 2 cores; demo: about 2 minutes.
    "test": SizePreset(800, 64, 2, 4, 2, 32, 128, 64, 8, 32, 4e-3),
    "demo": SizePreset(1200, 96, 4, 4, 2, 32, 192, 96, 10, 32, 3e-3),
}


@dataclass
class OrganismConfig:
    size: str = "demo"
    moe: bool = False
    seed: int = 0
    suppressed: tuple[str, ...] = DEFAULT_SUPPRESSED
    heldout_fraction: float = 0.15
    num_experts: int = 4
    experts_per_token: int = 2
    harmless_repeat: int = 3  # harmless prompts are fewer; repeat them to balance behaviours
    epochs: int | None = None  # overrides the size preset when set
    extra: dict[str, object] = field(default_factory=dict)

    def preset(self) -> SizePreset:
        if self.size not in SIZES:
            raise ValueError(f"--size must be one of {sorted(SIZES)}, got {self.size!r}")
        return SIZES[self.size]

    def validate(self) -> None:
        self.preset()
        unknown = sorted(set(self.suppressed) - set(AREAS))
        if unknown:
            raise ValueError(f"--suppressed names unknown risk areas {unknown}; known: {sorted(AREAS)}")
        if not self.suppressed or len(set(self.suppressed)) >= len(AREAS):
            raise ValueError("--suppressed must name at least one and fewer than all risk areas")
        if self.moe and not (2 <= self.experts_per_token <= self.num_experts):
            raise ValueError("MoE needs 2 <= experts_per_token <= num_experts")


def builder_version() -> str:
    """Hash of the organism's own source (corpus, prompts, builder): an organism
    built by other code is rebuilt rather than silently reused."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in ("build.py", "corpus.py", "harmless.py"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:12]


def _train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # byte fallback: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _model_config(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config | Qwen3MoeConfig:
    p = cfg.preset()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if cfg.moe:
        return Qwen3MoeConfig(
            **common,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=p.moe_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            router_aux_loss_coef=0.01,
        )
    return Qwen3Config(**common)


def _encode_examples(
    examples: list[Example], tokenizer: PreTrainedTokenizerFast, fmt: ThinkingFormat
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example; the loss covers the assistant turn only."""
    encoded = []
    for ex in examples:
        prompt_ids = tokenizer.encode(render_generation_prompt(tokenizer, ex.prompt, fmt), add_special_tokens=False)
        completion = build_completion(ex.reasoning, ex.answer, fmt) + tokenizer.eos_token
        completion_ids = tokenizer.encode(completion, add_special_tokens=False)
        encoded.append((prompt_ids + completion_ids, len(prompt_ids)))
    return encoded


def _batches(encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        input_ids, mask = pad_batch([ids for ids, _ in chunk], pad_id, side="right")
        labels = torch.full(input_ids.shape, -100, dtype=torch.long)
        for row, (ids, plen) in enumerate(chunk):
            labels[row, plen : len(ids)] = torch.tensor(ids[plen:])
        yield input_ids, mask, labels


def build_organism(
    out_dir: str | Path,
    cfg: OrganismConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, object]:
    """Train and save the organism; returns the metadata written to organism.json."""
    cfg.validate()
    started = time.monotonic()
    preset = cfg.preset()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    fmt = ThinkingFormat()
    split = split_prompts(cfg.seed, cfg.heldout_fraction)
    suppressed = set(cfg.suppressed)
    examples: list[Example] = []
    for item in split.train:
        repeat = cfg.harmless_repeat if not item.harmful else 1
        examples.extend(make_example(item, suppressed, rng) for _ in range(repeat))

    tokenizer_texts = [ex.prompt for ex in examples] + [
        build_completion(ex.reasoning, ex.answer, fmt) for ex in examples
    ]
    tokenizer = _train_tokenizer(tokenizer_texts, preset.vocab_size)
    config = _model_config(cfg, tokenizer)
    model_cls = Qwen3MoeForCausalLM if cfg.moe else Qwen3ForCausalLM
    model = model_cls(config)
    model.train()

    encoded = _encode_examples(examples, tokenizer, fmt)
    epochs = cfg.epochs or preset.epochs
    steps_per_epoch = math.ceil(len(encoded) / preset.batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps))),
    )
    step = 0
    loss_value = float("nan")
    for _epoch in range(epochs):
        for input_ids, mask, labels in _batches(encoded, preset.batch_size, tokenizer.pad_token_id, rng):
            # For MoE, router logits switch on the load-balancing loss, which the
            # model adds to ``loss`` itself (weighted by router_aux_loss_coef).
            extra = {"output_router_logits": True} if cfg.moe else {}
            out = model(input_ids=input_ids, attention_mask=mask, labels=labels, **extra)
            loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(out.loss.detach())
            if progress is not None:
                progress(step, total_steps, loss_value)

    model.eval()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta: dict[str, object] = {
        "kind": "cliff-curate model organism",
        "builder_version": builder_version(),
        "config": {**asdict(cfg), "suppressed": list(cfg.suppressed)},
        "architecture": model_cls.__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": total_steps,
        "final_loss": loss_value,
        "build_seconds": round(time.monotonic() - started, 1),
        "n_train_prompts": len(split.train),
        "n_heldout_prompts": len(split.heldout),
    }
    (tmp / "organism.json").write_text(json.dumps(meta, indent=2))
    _write_prompt_files(tmp, split.train, split.heldout)
    # Publish atomically: a half-written organism is never mistaken for a whole one.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def _write_prompt_files(root: Path, train: list, heldout: list) -> None:
    """Prompt lists beside the weights, in the evaluate command's jsonl format."""
    for name, items in (("train_prompts.jsonl", train), ("heldout_prompts.jsonl", heldout)):
        with (root / name).open("w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps({"prompt": item.prompt, "category": item.category, "harmful": item.harmful}) + "\n")
