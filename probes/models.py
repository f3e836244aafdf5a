"""Model loading: the one place any model, bundled organism or real checkpoint,
is read from disk. ``trust_remote_code`` stays off unless the caller asks."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from probes.files import path_sha256


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: temperature 0 is greedy. Each generation batch is seeded
    from ``seed`` and its position, so a rerun with the same batches repeats."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_WEIGHT_SUFFIXES = (".safetensors",)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str
    fingerprint: str
    adapter: str | None = None
    # How this model is decoded wherever it generates; recorded with every result that depends on it.
    sampling: Sampling = field(default_factory=lambda: Sampling())
    # Where unsteered generation runs: None in-process (HF generate), or a probes.remote_generate.RemoteGenerator
    # (a vLLM server). Steered or adapted generation always stays in-process (probes.generate).
    generator: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def end_tokens(self) -> tuple[str, ...]:
        """The strings that end this model's turn (``probes.chat.end_tokens``)."""
        from probes.chat import end_tokens

        return end_tokens(self.tokenizer, getattr(self.model, "generation_config", None))


def model_hidden_size(lm: LoadedModel) -> int:
    return int(lm.model.config.get_text_config().hidden_size)


def context_limit(lm: LoadedModel) -> int | None:
    """The most positions the model takes (prompt plus generated tokens), if its config says."""
    config = lm.model.config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs that support it; fp32 on CPU, where bf16 matmuls are slow.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from None


def _cached_digest(path: Path) -> str:
    """Content digest of a (possibly multi-GB) weight file, cached by size and mtime
    so a nightly job does not re-read a real model's shards on every run."""
    cache_file = Path(os.environ.get("CURATE_CACHE_DIR", Path.home() / ".cache" / "cliff-curate")) / "digests.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if key in cache:
        return cache[key]
    digest = path_sha256(path)
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def fingerprint_model_dir(path: str | Path, adapter: str | Path | None = None) -> str:
    """A stable id for "these weights with this tokenizer": scores and probes are
    keyed by it, so changing either rescoring or refuses a mismatched probe."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        f = root / name
        if f.exists():
            h.update(name.encode())
            h.update(path_sha256(f).encode())
    weights = sorted(p for p in root.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in {root} (pickled .bin weights are not loaded)")
    for w in weights:
        h.update(w.name.encode())
        h.update(_cached_digest(w).encode())
    if adapter is not None:
        for name in _ADAPTER_FILES:
            f = Path(adapter) / name
            if f.exists():
                h.update(("adapter/" + name).encode())
                h.update(path_sha256(f).encode())
    return h.hexdigest()[:16]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_LIBRARY_PROGRESS = [False]  # library bars (weights, datasets) shown: set by the command line, off for library use


def set_library_progress(bars: bool, verbose: bool = False) -> None:
    """The transformers and datasets progress bars follow the command line's rule (shown on a
    terminal, off in a log) instead of being switched off; ``verbose`` lets their logs through."""
    import datasets

    _LIBRARY_PROGRESS[0] = bars
    if bars:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    if verbose:
        hf_logging.set_verbosity_info()
        datasets.logging.set_verbosity_info()


def load_model(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local Hugging Face directory,
    optionally with a PEFT LoRA adapter (merged by default, for faster inference).

    With ``device_map`` (e.g. ``"auto"``) the weights are placed while loading,
    across GPUs if need be, instead of being loaded on CPU and moved."""
    fingerprint = fingerprint_model_dir(path, adapter)
    dev = resolve_device(device if device_map is None else "auto")
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if not _LIBRARY_PROGRESS[0]:
        hf_logging.disable_progress_bar()  # off a terminal, per-load weight bars are noise in a log
    extra: dict[str, object] = {}
    if device_map is not None:
        extra["device_map"] = device_map
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
    )
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            # PEFT 0.21 reads transformers' deprecated gradient-checkpointing name, and
            # warns about its own built-in MoE alpha pattern on models without fused
            # expert weights; neither concerns an inference load.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*(alpha|rank)_pattern keys did not match.*", category=RuntimeWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
        if merge_adapter:
            model = model.merge_and_unload()
    if device_map is None:
        model.to(dev)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=str(path),
        fingerprint=fingerprint,
        adapter=str(adapter) if adapter is not None else None,
    )


def load_model_shell(path: str | Path, *, trust_remote_code: bool = False, dtype: str = "float32") -> LoadedModel:
    """Tokenizer, config and fingerprint with the weights left out (the model is
    built on the meta device): what a driver needs when the model itself runs
    elsewhere (Ray actors), without loading it into the driver's memory."""
    fingerprint = fingerprint_model_dir(path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        # In the dtype the real copies are loaded in: it is part of the generation settings' digest.
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=resolve_dtype(dtype, torch.device("cpu")))
    return LoadedModel(model=model, tokenizer=tokenizer, path=str(path), fingerprint=fingerprint)
