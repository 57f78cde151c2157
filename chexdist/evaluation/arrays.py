"""Array checks and small helpers shared by the metrics and the bootstrap.

Targets may hold NaN (`chexdist.labels.UNKNOWN`): a finding the sample's dataset does not label.
:func:`as_arrays` turns it into UNKNOWN_TARGET (-1), and every metric uses, per class, only the
samples whose target is 0 or 1 there.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

DEFAULT_THRESHOLD = 0.5
UNKNOWN_TARGET = -1


def to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ChexdistError(f"{name}: not a numeric array ({e})") from None


def check_labels(labels: Sequence[str], n_classes: int) -> list[str]:
    labels = list(labels)
    if len(labels) != n_classes:
        raise ChexdistError(f"got {n_classes} classes but {len(labels)} label names")
    if len(set(labels)) != len(labels):
        raise ChexdistError(f"duplicate label names in {labels}")
    return labels


def as_arrays(probs: Any, targets: Any, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate and convert to float64 probabilities and int64 targets, both [N, C]: 1, 0, or
    UNKNOWN_TARGET (-1) where the target is NaN (`chexdist.labels.UNKNOWN`: not labelled)."""
    p = to_numpy(probs, "probs")
    y = to_numpy(targets, "targets")
    if p.ndim != 2:
        raise ChexdistError(f"probs: expected shape [N, {len(labels)}], got {list(p.shape)}")
    if y.shape != p.shape:
        raise ChexdistError(f"targets shape {list(y.shape)} differs from probs shape {list(p.shape)}")
    if p.shape[0] == 0:
        raise ChexdistError("probs: no samples")
    names = check_labels(labels, p.shape[1])
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        cls = names[int(np.nonzero(bad.any(axis=0))[0][0])]
        raise ChexdistError(f"probs: values outside [0, 1] or NaN for {cls}; pass sigmoid(logits), not logits")
    unknown = np.isnan(y)
    not_binary = (y != 0) & (y != 1) & ~unknown
    if not_binary.any():
        cls = names[int(np.nonzero(not_binary.any(axis=0))[0][0])]
        raise ChexdistError(f"targets: values other than 0/1 (or NaN for unknown) for {cls}")
    return p, np.where(unknown, UNKNOWN_TARGET, y).astype(np.int64), names


def threshold_array(thresholds: Any = None, labels: Sequence[str] = LABELS) -> np.ndarray:
    """Turn None (0.5), a scalar, a sequence in label order, or a {label: value} dict into a [C] array.

    A dict must name every label and nothing else, so thresholds saved in ``best.json`` can never be
    applied to the wrong finding.
    """
    labels = list(labels)
    if thresholds is None:
        values = np.full(len(labels), DEFAULT_THRESHOLD)
    elif isinstance(thresholds, Mapping):
        missing = [name for name in labels if name not in thresholds]
        unknown = [str(name) for name in thresholds if name not in labels]
        if missing or unknown:
            raise ChexdistError(f"thresholds: missing labels {missing}, unknown labels {unknown}")
        values = to_numpy([thresholds[name] for name in labels], "thresholds")
    elif isinstance(thresholds, numbers.Real):
        values = np.full(len(labels), float(thresholds))
    else:
        values = to_numpy(thresholds, "thresholds")
        if values.ndim == 0:
            values = np.full(len(labels), float(values))
    if values.shape != (len(labels),):
        raise ChexdistError(f"thresholds: expected {len(labels)} values, got shape {list(values.shape)}")
    if not (np.isfinite(values) & (values >= 0) & (values <= 1)).all():
        raise ChexdistError(f"thresholds: every value must be in [0, 1], got {values.tolist()}")
    return values


def nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's RuntimeWarning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def by_label(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(labels, values)}


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def tie_blocks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order by descending score and the start index of each run of equal scores in that order.

    Every distinct score is one operating point of the ROC/PR curve (``score >= t``), so per-block
    sums of (weighted) positives and negatives are all the curves need.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.concatenate(([0], np.nonzero(ranked[1:] != ranked[:-1])[0] + 1))
    return order, starts


