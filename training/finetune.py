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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from probes.chat import ThinkingFormat
from probes.files import path_sha256
from probes.models import load_model
from probes.rows import iter_rows
from training import robust, robust_setup
from training.adapter_card import adapter_card
from training.robust import RobustConfig, robust_callback
from training.targets import check_trained_labels, fit_targets


@dataclass
class FinetuneConfig:
    epochs: float = 10.0
    learning_rate: float = 1e-3
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    # Tokens of prompt + reasoning + answer. Reasoning models think for 1-4k tokens: a target longer
    # than this is dropped or refused (too_long), never truncated (see training.targets).
    max_length: int = 4096
    too_long: str = "drop"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Attack-in-the-loop training (training.robust); None trains plainly.
    robust: RobustConfig | None = None
    robust_kit: str | None = None  # attack kit of the base model: the direction's (layer, position), MoE refusal experts


def step_lines(log: Callable[[str], None]) -> object:
    """A Trainer callback for runs without a terminal: one line per logging step, with the loss,
    the rate and the time left. (Built here so that importing this module does not import transformers.)"""
    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - the Trainer's callback signature
            if not logs or "loss" not in logs:
                return
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = state.global_step / elapsed
            left = (state.max_steps - state.global_step) / rate if rate else 0.0
            log(f"fine-tune: step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4f} "
                f"({rate:.2f} steps/s, ETA {left:.0f}s)")

    return StepLines()


def read_training_pairs(path: str | Path) -> list[dict[str, str]]:
    """Selected pairs (prompt, reasoning, answer) as ``curate select`` writes them, in any of its
    formats: jsonl, parquet or a saved Hugging Face dataset (read by ``probes.rows``)."""
    rows = []
    for row in iter_rows(path, "--data"):
        where = f"{row.file}:{row.locator}"
        if row.error is not None:
            raise ValueError(f"{where}: {row.error}")
        obj = row.value
        for name in ("prompt", "reasoning", "answer"):
            if not isinstance(obj, dict) or not isinstance(obj.get(name), str):
                raise ValueError(f"{where}: field '{name}' must be a string (is this a curate select export?)")
        if not obj["answer"].strip():
            raise ValueError(f"{where}: field 'answer' is empty")
        rows.append(obj)
    if not rows:
        raise ValueError(f"{path} holds no training pairs")
    return rows


def slice_lineage(path: str | Path) -> dict[str, object] | None:
    """The selection manifest written beside a slice by ``curate select``, if there is one."""
    manifest = Path(str(path).rstrip("/") + ".manifest.json")
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return {k: v for k, v in data.items() if k != "ids"} if isinstance(data, dict) else None


def finetune_lora(
    model_path: str | Path,
    data_file: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig,
    fmt: ThinkingFormat | None = None,
    retain_file: str | Path | None = None,
    progress: str = "off",
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Train a LoRA adapter and save it (safetensors) to ``out_dir`` atomically.

    ``retain_file`` adds pairs in the same format that hold the model's helpful
    behaviour (``curate retain`` makes them from its own answers to harmless
    prompts). Without them a slice of refusals alone teaches a small model to
    refuse everything; keep the retain set fixed when comparing selections.
    ``progress``: ``bar`` (TRL's own bar, on a terminal), ``lines`` (one ``log`` line per
    logging step, with the rate and time left) or ``off``.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    fmt = fmt or ThinkingFormat()
    pairs = read_training_pairs(data_file)
    n_safety = len(pairs)
    harmful_prompts = [p["prompt"] for p in pairs]
    if retain_file is not None:
        pairs = pairs + read_training_pairs(retain_file)
    lm = load_model(model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "right"  # training batches pad on the right
    rows, dropped, answers = fit_targets(tokenizer, pairs, fmt, cfg.max_length, cfg.too_long)
    if dropped:
        log(f"warning: {len(dropped)} of {len(pairs)} training examples are longer than --max-length {cfg.max_length} "
            f"and were dropped, not truncated (the longest: {max(d['tokens'] for d in dropped)} tokens); see finetune.json")
    if not rows:
        raise ValueError(f"no training example fits --max-length {cfg.max_length}")
    dataset = Dataset.from_list(rows)
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
                logging_steps=5,
                save_strategy="no",
                report_to=[],
                max_length=cfg.max_length,
                completion_only_loss=True,
                seed=cfg.seed,
                use_cpu=lm.device.type == "cpu",
                bf16=lm.model.dtype == torch.bfloat16,
                dataloader_num_workers=0,
                disable_tqdm=progress != "bar",
                # Checkpointing recomputes each layer's forward during backward, after a robust method's
                # per-loss hooks (LAT's perturbation, per-batch row masks) are gone or changed: the
                # gradients would belong to another forward than the loss. Robust training keeps activations.
                gradient_checkpointing=cfg.robust is None,
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
            if progress == "lines":
                trainer.add_callback(step_lines(log))
            labels = check_trained_labels(trainer, tokenizer, fmt.close_marker, answers)
            if labels["with_close_marker_and_answer"] < labels["examples"]:
                log(f"warning: {labels['examples'] - labels['with_close_marker_and_answer']} training examples do not train "
                    f"on the close marker and the answer (examples {labels['missing']})")
            loop, adversary, early = None, None, None
            if cfg.robust is not None and cfg.robust.method == "lat":
                adversary = robust_setup.latent_adversary(trainer, tokenizer, harmful_prompts, fmt, cfg.robust)
            elif cfg.robust is not None:
                loop = robust_setup.attack_in_the_loop(lm, trainer.model, pairs[:n_safety], pairs[n_safety:], fmt, cfg.robust,
                                                      cfg.robust_kit)
                trainer.add_callback(robust_callback(loop))
                if cfg.robust.harmful_rows_only:
                    robust_setup.attack_rows(trainer, loop, tokenizer, harmful_prompts, fmt)
            if cfg.robust is not None and cfg.robust.early_tokens:
                # Outermost: its own short forward runs under a step's mounted attack but outside the
                # per-batch row masks and LAT's per-batch perturbation, which are shaped for the full batch.
                early = robust_setup.deeper_refusal(trainer, tokenizer, harmful_prompts, fmt, cfg.robust)
            try:
                result = trainer.train()
            finally:
                if loop is not None:
                    loop.close()  # an exception mid-step must not leave a hook on the model
            robust_summary = robust.summary(loop) if loop is not None else None
            if adversary is not None:
                robust_summary = {"config": asdict(cfg.robust), "lat": asdict(adversary.state)}
            if early is not None and robust_summary is not None:
                robust_summary["early_tokens"] = asdict(early)
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
        "n_examples": len(rows),
        "n_dropped_too_long": len(dropped),
        "dropped_too_long": dropped[:100],
        "labels": labels,
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "seconds": round(time.monotonic() - started, 1),
        "gradient_checkpointing": cfg.robust is None,
        "config": asdict(cfg),
        "robust": robust_summary,
    }
    summary["data_sha256"] = path_sha256(data_file)
    summary["data_lineage"] = slice_lineage(data_file)
    (tmp / "finetune.json").write_text(json.dumps(summary, indent=2))
    (tmp / "README.md").write_text(adapter_card(summary), encoding="utf-8")  # in place of PEFT's empty template
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def export_merged(model_path: str | Path, adapter: str | Path, out_dir: str | Path, cfg: FinetuneConfig) -> Path:
    """Base + adapter merged into plain weights (safetensors) with the tokenizer, ready to serve;
    written to a temporary folder and renamed into place."""
    lm = load_model(model_path, adapter=adapter, device=cfg.device, dtype=cfg.dtype,
                    trust_remote_code=cfg.trust_remote_code, merge_adapter=True)
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        lm.model.save_pretrained(str(tmp), safe_serialization=True)
        lm.tokenizer.save_pretrained(str(tmp))
        card = Path(adapter) / "README.md"
        if card.is_file():
            (tmp / "README.md").write_text(card.read_text(encoding="utf-8").replace(
                "# LoRA adapter:", f"# Merged model (base + adapter `{adapter}`):", 1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
