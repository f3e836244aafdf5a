"""Fitting refusal probes: one logistic regression per layer on a shared,
class-balanced held-out split, and the choice of layer.

Kept apart from ``probes.refusal`` (loading and applying a probe) so that the
scoring path never imports scikit-learn and SciPy: about 100 MB of resident
memory in every scoring process and Ray actor, for code only training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from probes.refusal import POSITION_PROTOCOL, LayerResult, ProbeMetadata, RefusalProbe, compute_probe_id


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
        meta = ProbeMetadata(
            layer=li,
            hidden_size=x.shape[1],
            model_fingerprint=model_fingerprint,
            C=c,
            n_positive=int(balance.min()),
            n_negative=int(balance.min()),
            heldout_fraction=heldout_fraction,
            created_at=created,
            probe_id=compute_probe_id(weight, bias, li, model_fingerprint, POSITION_PROTOCOL),
        )
        probes[li] = RefusalProbe(weight=weight, bias=bias, meta=meta)
    return ProbeSweep(probes=probes, results=results, heldout_index=np.asarray(idx_test))

