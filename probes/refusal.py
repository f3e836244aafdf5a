"""The linear refusal probe: training with a per-layer sweep, saving as
safetensors + JSON (never pickle), loading with model checks, and scoring.

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from probes.models import LoadedModel, model_hidden_size

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
# Reference protocol (RefusalCliff): the hidden state at the last token of the
# closing reasoning marker, i.e. where the model commits to its answer.
POSITION_PROTOCOL = "last token of the close marker"


class ProbeMismatchError(ValueError):
    """The probe was trained on a different model than the one it is applied to."""


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
        """Read a probe for ``lm``, refusing one trained on another model."""
        return cls.load(directory, model_fingerprint=lm.fingerprint, hidden_size=model_hidden_size(lm))

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
        """Write probe.safetensors + probe.json atomically into ``directory``."""
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
        tensors = load_file(str(root / PROBE_WEIGHTS))
        raw = json.loads((root / PROBE_META).read_text())
        raw["sweep"] = [LayerResult(**r) for r in raw.get("sweep", [])]
        meta = ProbeMetadata(**raw)
        weight = tensors["weight"]
        if weight.ndim != 1 or weight.shape[0] != meta.hidden_size:
            raise ValueError(f"{root / PROBE_WEIGHTS}: weight shape {tuple(weight.shape)} does not match metadata")
        probe = cls(weight=weight, bias=float(tensors["bias"][0]), meta=meta)
        if model_fingerprint is not None or hidden_size is not None:
            probe.check_model(model_fingerprint or meta.model_fingerprint, hidden_size or meta.hidden_size)
        return probe


def _fit_layer(
    x_train: np.ndarray, y_train: np.ndarray, seed: int
) -> tuple[np.ndarray, float, float]:
    """Fit one layer; returns raw-space (weight, bias, C)."""
    scaler = StandardScaler().fit(x_train)
    folds = int(min(5, np.bincount(y_train).min()))
    if folds < 2:
        raise ValueError("probe training needs at least 2 examples of each class in the training split")
    # Regularisation chosen by cross-validated log-loss (not accuracy, which ties
    # at 1.0 for every C on separable data and so cannot choose).
    clf = LogisticRegressionCV(
        Cs=[0.001, 0.01, 0.1, 1.0, 10.0],
        cv=folds,
        l1_ratios=(0,),
        scoring="neg_log_loss",
        use_legacy_attributes=False,
        max_iter=2000,
        random_state=seed,
    )
    clf.fit(scaler.transform(x_train), y_train)
    coef = clf.coef_[0] / scaler.scale_
    bias = float(clf.intercept_[0] - np.dot(coef, scaler.mean_))
    return coef, bias, float(np.atleast_1d(clf.C_)[0])


@dataclass
class ProbeSweep:
    """One fitted probe per layer, their held-out results, and the split used."""

    probes: dict[int, RefusalProbe]
    results: list[LayerResult]
    heldout_index: np.ndarray

    def choose(self) -> RefusalProbe:
        """The best layer: held-out AUROC (in 0.005 steps), then span gap where
        measured, then accuracy, then the deeper layer (the reference protocol's
        choice, because the final layers carry the decision about to be voiced)."""

        def key(r: LayerResult) -> tuple[float, float, float, int]:
            gap = r.span_gap if r.span_gap is not None else 0.0
            return (round(r.heldout_auroc / 0.005), round(gap, 2), r.heldout_accuracy, r.layer)

        best = max(self.results, key=key)
        probe = self.probes[best.layer]
        probe.meta.sweep = list(self.results)
        return probe


def sweep_layers(
    features: dict[int, np.ndarray],
    labels: np.ndarray,
    *,
    model_fingerprint: str,
    heldout_fraction: float = 0.25,
    seed: int = 0,
) -> ProbeSweep:
    """Fit a probe on every layer in ``features`` (``layer -> [n, hidden]``;
    labels 1 = refusal) with balanced classes and a shared held-out split."""
    labels = np.asarray(labels, dtype=np.int64)
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("probe training needs both refusal (1) and compliance (0) examples")
    balance = np.bincount(labels)
    # Class balance by down-sampling the larger class, as in the reference protocol.
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=balance.min(), replace=False) for c in (0, 1)])
    keep.sort()
    idx_train, idx_test = train_test_split(keep, test_size=heldout_fraction, stratify=labels[keep], random_state=seed)
    results: list[LayerResult] = []
    probes: dict[int, RefusalProbe] = {}
    created = datetime.now(UTC).isoformat(timespec="seconds")
    for li in sorted(features):
        x = features[li].astype(np.float64)
        coef, bias, c = _fit_layer(x[idx_train], labels[idx_train], seed)
        logits = x[idx_test] @ coef + bias
        acc = float(accuracy_score(labels[idx_test], (logits > 0).astype(int)))
        auroc = float(roc_auc_score(labels[idx_test], logits))
        results.append(LayerResult(layer=li, heldout_accuracy=acc, heldout_auroc=auroc, C=c))
        weight = torch.tensor(coef, dtype=torch.float32)
        h = hashlib.sha256(weight.numpy().tobytes())
        h.update(f"{bias}|{li}|{model_fingerprint}".encode())
        meta = ProbeMetadata(
            layer=li,
            hidden_size=x.shape[1],
            model_fingerprint=model_fingerprint,
            C=c,
            n_positive=int(balance.min()),
            n_negative=int(balance.min()),
            heldout_fraction=heldout_fraction,
            created_at=created,
            probe_id=h.hexdigest()[:16],
        )
        probes[li] = RefusalProbe(weight=weight, bias=bias, meta=meta)
    return ProbeSweep(probes=probes, results=results, heldout_index=np.asarray(idx_test))

