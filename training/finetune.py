"""LoRA supervised fine-tuning on a selected slice with TRL's SFTTrainer.

The dataset is in TRL's prompt-completion form: the prompt is the model's own
generation prompt (rendered by probes.chat, so it ends inside the open thinking
block) and the completion is reasoning, close marker and answer. TRL then puts
the loss on the completion only, i.e. on the assistant turn.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from probes.chat import ThinkingFormat, build_completion, render_generation_prompt
from probes.models import load_model


@dataclass
class FinetuneConfig:
    epochs: float = 10.0
    learning_rate: float = 1e-3
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    max_length: int = 512
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False


def read_training_pairs(path: str | Path) -> list[dict[str, str]]:
    """Selected pairs as written by ``curate select`` (prompt, reasoning, answer)."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            for name in ("prompt", "reasoning", "answer"):
                if not isinstance(obj.get(name), str):
                    raise ValueError(f"{path}:{lineno}: field '{name}' must be a string (is this a curate select export?)")
            if not obj["answer"].strip():
                raise ValueError(f"{path}:{lineno}: field 'answer' is empty")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{path} holds no training pairs")
    return rows


def finetune_lora(
    model_path: str | Path,
    data_file: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig,
    fmt: ThinkingFormat | None = None,
    retain_file: str | Path | None = None,
) -> dict[str, object]:
    """Train a LoRA adapter and save it (safetensors) to ``out_dir`` atomically.

    ``retain_file`` adds pairs in the same format that hold the model's helpful
    behaviour (``curate retain`` makes them from its own answers to harmless
    prompts). Without them a slice of refusals alone teaches a small model to
    refuse everything; keep the retain set fixed when comparing selections.
    """
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()  # the CLI shows its own progress

    fmt = fmt or ThinkingFormat()
    pairs = read_training_pairs(data_file)
    n_safety = len(pairs)
    if retain_file is not None:
        pairs = pairs + read_training_pairs(retain_file)
    lm = load_model(model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "right"  # training batches pad on the right
    dataset = Dataset.from_list(
        [
            {
                "prompt": render_generation_prompt(tokenizer, p["prompt"], fmt),
                "completion": build_completion(p["reasoning"], p["answer"], fmt),
            }
            for p in pairs
        ]
    )
    out = Path(out_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="curate-sft-") as scratch:
        with warnings.catch_warnings():
            # transformers 5 renamed gradient checkpointing; TRL 1.x still reads the old name.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            # PEFT's built-in MoE patterns name fused expert weights that "all-linear" does not target.
            warnings.filterwarnings("ignore", message=".*(alpha|rank)_pattern keys did not match.*", category=RuntimeWarning)
            args = SFTConfig(
                output_dir=scratch,
                num_train_epochs=cfg.epochs,
                learning_rate=cfg.learning_rate,
                per_device_train_batch_size=cfg.batch_size,
                lr_scheduler_type="constant",
                warmup_steps=0,
                logging_steps=10,
                save_strategy="no",
                report_to=[],
                max_length=cfg.max_length,
                completion_only_loss=True,
                seed=cfg.seed,
                use_cpu=lm.device.type == "cpu",
                bf16=lm.model.dtype == torch.bfloat16,
                dataloader_num_workers=0,
                disable_tqdm=True,
            )
            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                task_type="CAUSAL_LM",
            )
            lm.model.train()
            trainer = SFTTrainer(model=lm.model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
            trainer.remove_callback(PrinterCallback)  # per-step loss dicts on stdout; the summary keeps the loss
            result = trainer.train()
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            if tmp.exists():
                shutil.rmtree(tmp)
            trainer.model.save_pretrained(str(tmp), safe_serialization=True)
    summary: dict[str, object] = {
        "base_model": str(model_path),
        "base_fingerprint": lm.fingerprint,
        "data": str(data_file),
        "retain": str(retain_file) if retain_file is not None else None,
        "n_safety_examples": n_safety,
        "n_examples": len(pairs),
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "seconds": round(time.monotonic() - started, 1),
        "config": asdict(cfg),
    }
    (tmp / "finetune.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary
