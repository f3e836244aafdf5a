"""The linear refusal probe: saving as safetensors + JSON (never pickle),
loading with model checks, and scoring (fitting is in ``probes.probe_fit``).

The probe is one logistic unit on a decoder layer's residual stream. The
scaler used while fitting is folded into the weights, so applying the probe is
``sigmoid(h · w + b)`` on raw hidden states: a matrix-vector product on the
model's own device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from probes.capture import num_layers
from probes.models import LoadedModel, model_hidden_size

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
# Reference protocol (RefusalCliff): the hidden state at the last token of the
# closing reasoning marker, i.e. where the model commits to its answer.
POSITION_PROTOCOL = "last token of the close marker"


class ProbeMismatchError(ValueError):
    """The probe was trained on a different model than the one it is applied to."""


def compute_probe_id(weight: torch.Tensor, bias: float, layer: int, model_fingerprint: str, position: str) -> str:
    """The probe's identity: a digest of everything that changes its scores (the weights, the bias,
    the layer and position it reads, the model it was fitted on). Computed, never taken on trust:
    a probe whose files were changed after training gets another id, so its scores never mix
    with the original's."""
    h = hashlib.sha256(weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    h.update(f"{bias}|{layer}|{model_fingerprint}".encode())
    if position != POSITION_PROTOCOL:  # the one position so far: ids of probes saved before this line stay valid
        h.update(f"|{position}".encode())
    return h.hexdigest()[:16]


@dataclass
class LayerResult:
    layer: int
    heldout_accuracy: float
    heldout_auroc: float
    C: float
    # Mean probe score over the reasoning of held-out refusals minus that of
    # held-out harmless answers: does the probe hold the refusal signal while
    # the model reasons (the plateau I), not only at the last token?
    span_gap: float | None = None


@dataclass
class ProbeMetadata:
    layer: int
    hidden_size: int
    model_fingerprint: str
    position: str = POSITION_PROTOCOL
    C: float = 1.0
    n_positive: int = 0
    n_negative: int = 0
    heldout_fraction: float = 0.25
    sweep: list[LayerResult] = field(default_factory=list)
    created_at: str = ""
    probe_id: str = ""
    # How the traces it was fitted on were generated (budget, decoding, format): its labels depend on them.
    generation: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefusalProbe:
    weight: torch.Tensor  # [hidden], float32
    bias: float
    meta: ProbeMetadata

    @property
    def layer(self) -> int:
        return self.meta.layer

    @property
    def probe_id(self) -> str:
        return self.meta.probe_id

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probe logits for hidden states ``[..., hidden]`` on their own device."""
        w = self.weight.to(device=hidden.device, dtype=torch.float32)
        return hidden.float() @ w + self.bias

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Refusal scores in [0, 1]."""
        return torch.sigmoid(self.logits(hidden))

    @classmethod
    def load_for(cls, directory: str | Path, lm: LoadedModel) -> RefusalProbe:
        """Read a probe for ``lm``, refusing one trained on another model or reading a layer it lacks."""
        probe = cls.load(directory, model_fingerprint=lm.fingerprint, hidden_size=model_hidden_size(lm))
        n = num_layers(lm.model)
        if not 0 <= probe.layer < n:
            raise ProbeMismatchError(f"probe {directory}: layer {probe.layer} is outside the model's {n} layers (0-{n - 1})")
        return probe

    def check_model(self, fingerprint: str, hidden_size: int) -> None:
        if hidden_size != self.meta.hidden_size:
            raise ProbeMismatchError(
                f"probe {self.probe_id} expects hidden size {self.meta.hidden_size}, "
                f"the model has {hidden_size}: it was trained on another model"
            )
        if fingerprint != self.meta.model_fingerprint:
            raise ProbeMismatchError(
                f"probe {self.probe_id} was trained on model {self.meta.model_fingerprint}, "
                f"not on {fingerprint}; train a probe for this model (curate probe train)"
            )

    def save(self, directory: str | Path) -> Path:
        """Write probe.safetensors + probe.json atomically into ``directory``; the id written is
        the one computed from what is saved."""
        self.meta.probe_id = compute_probe_id(self.weight, self.bias, self.meta.layer, self.meta.model_fingerprint,
                                              self.meta.position)
        out = Path(directory)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        # float64 bias: a float32 one would make the reloaded probe score differently.
        tensors = {"weight": self.weight.contiguous().float(), "bias": torch.tensor([self.bias], dtype=torch.float64)}
        save_file(tensors, str(tmp / PROBE_WEIGHTS))
        (tmp / PROBE_META).write_text(json.dumps(asdict(self.meta), indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def load(
        cls, directory: str | Path, *, model_fingerprint: str | None = None, hidden_size: int | None = None
    ) -> RefusalProbe:
        """Read a probe; given the target model's fingerprint and hidden size, a
        probe trained on another model is refused here rather than at first use."""
        root = Path(directory)
        if not (root / PROBE_WEIGHTS).exists() or not (root / PROBE_META).exists():
            raise FileNotFoundError(f"{root} is not a probe directory (needs {PROBE_WEIGHTS} and {PROBE_META})")
        try:
            tensors = load_file(str(root / PROBE_WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{root / PROBE_WEIGHTS} is not a valid safetensors file: {exc}") from None
        if set(tensors) != {"weight", "bias"} or tensors["bias"].numel() != 1:
            raise ValueError(f"{root / PROBE_WEIGHTS}: expected tensors 'weight' and a one-element 'bias', got {sorted(tensors)}")
        meta = _read_meta(root / PROBE_META)
        weight = tensors["weight"]
        if weight.ndim != 1 or weight.shape[0] != meta.hidden_size:
            raise ValueError(f"{root / PROBE_WEIGHTS}: weight shape {tuple(weight.shape)} does not match metadata")
        probe = cls(weight=weight, bias=float(tensors["bias"][0]), meta=meta)
        computed = compute_probe_id(weight, probe.bias, meta.layer, meta.model_fingerprint, meta.position)
        if computed != meta.probe_id:
            raise ProbeMismatchError(
                f"probe {root}: {PROBE_META} names probe id {meta.probe_id!r}, but its weights and metadata hash to "
                f"{computed!r}: the files were changed after training; train the probe again (curate probe train)")
        if model_fingerprint is not None or hidden_size is not None:
            probe.check_model(model_fingerprint or meta.model_fingerprint, hidden_size or meta.hidden_size)
        return probe


def _read_meta(path: Path) -> ProbeMetadata:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    required = [f.name for f in fields(ProbeMetadata) if f.name in ("layer", "hidden_size", "model_fingerprint", "probe_id")]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {', '.join(missing)}")
    unknown = sorted(set(raw) - {f.name for f in fields(ProbeMetadata)})
    if unknown:
        raise ValueError(f"{path}: unknown keys {', '.join(unknown)}")
    try:
        raw["sweep"] = [LayerResult(**r) for r in raw.get("sweep", [])]
        meta = ProbeMetadata(**raw)
    except TypeError as exc:
        raise ValueError(f"{path}: bad sweep entry ({exc})") from None
    if not isinstance(meta.layer, int) or isinstance(meta.layer, bool) or not isinstance(meta.hidden_size, int):
        raise ValueError(f"{path}: 'layer' and 'hidden_size' must be integers")
    return meta
