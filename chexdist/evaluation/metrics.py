"""Per-class AUROC/AP/F1 (torchmetrics), F1-optimal thresholds, and patient-level bootstrap CIs.

Conventions shared by every function here:

- ``probs`` and ``targets`` are [N, C] (numpy, torch or nested lists); probabilities must already be
  in [0, 1] (torchmetrics would silently apply a sigmoid to anything else, so we refuse it).
- A finding is predicted positive when ``prob >= threshold``.
- ``targets`` may hold NaN for a label that is unknown (a finding the sample's dataset does not
  label): every per-class number then uses only the samples whose label is known for that class
  (``known`` in the result counts them); a class with no known sample is NaN like one without
  positives.
- A class with no positives (or no negatives) in the data cannot be ranked: its AUROC and AP are
  NaN; without negatives its specificity is NaN. With no positives its F1, precision and recall are NaN too (recall is 0/0, and scoring a
  finding the split does not contain would only add noise to the macro mean). Otherwise precision
  and F1 follow scikit-learn's ``zero_division=0``: no predicted positives gives 0.
- Macro means are NaN-ignoring means (``nanmean``) over classes, so they cover only the classes
  the data can score; ``positives`` in the result shows which those are.
- Results keep NaN as a float; ``json.dumps`` writes it as ``NaN``, which Python reads back.

Per epoch the engine tunes on the gathered validation predictions and scores at those thresholds::

    thresholds = tune_thresholds(val_probs, val_targets)
    val = per_class_metrics(val_probs, val_targets, thresholds)  # val["thresholds"] -> best.json

That validation F1 is optimistic (tuned and scored on the same split): fine for model selection,
not for reporting; test metrics use these fixed thresholds.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from chexdist.errors import ChexdistError
from chexdist.evaluation.arrays import DEFAULT_THRESHOLD, as_arrays, by_label, nanmean, ratio, threshold_array, tie_blocks, to_numpy
from chexdist.evaluation.bootstrap import (
    CI_METHODS, Resampler, bootstrap_ci, bootstrap_mean_ci, delong_auc_cov, delong_test, paired_bootstrap_auc,
)  # fmt: skip
from chexdist.labels import LABELS

__all__ = ["THRESHOLD_METRICS", "CI_METHODS", "DEFAULT_THRESHOLD", "Resampler", "bootstrap_ci", "bootstrap_mean_ci",
           "curve_points", "delong_auc_cov", "delong_test", "paired_bootstrap_auc", "per_class_metrics", "reliability",
           "threshold_array", "tune_thresholds"]

THRESHOLD_METRICS: tuple[str, ...] = ("f1",)
"""Values accepted by ``tune_thresholds(metric=...)`` (config key ``eval.threshold_metric``)."""


def per_class_metrics(
    probs: Any, targets: Any, thresholds: Any = None, labels: Sequence[str] = LABELS
) -> dict[str, Any]:
    """Per-class AUROC, AP, and F1/precision/recall/specificity at ``thresholds``, plus NaN-ignoring macro means.

    Thresholds default to 0.5; for honest test numbers pass the ones ``tune_thresholds`` found on the
    validation split. Classes that cannot be scored are NaN (see the module docstring) and trigger
    exactly one warning naming them. The result holds only floats, ints, strings and dicts, so it can
    go straight into ``metrics.json`` / ``best.json``.
    """
    p, y, names = as_arrays(probs, targets, labels)
    t = threshold_array(thresholds, names)
    n = p.shape[0]
    known = y >= 0
    pos = (y == 1).sum(axis=0)
    neg = (y == 0).sum(axis=0)

    auc = np.full(len(names), np.nan)
    ap = np.full(len(names), np.nan)
    scored = np.nonzero((pos > 0) & (neg > 0))[0]
    p_t, y_t = torch.from_numpy(p), torch.from_numpy(y)
    for j in scored:
        rows = torch.from_numpy(known[:, j])
        auc[j] = float(binary_auroc(p_t[rows, j], y_t[rows, j], validate_args=False))
        ap[j] = float(binary_average_precision(p_t[rows, j], y_t[rows, j], validate_args=False))

    pred = (p >= t) & known
    tp = (pred & (y == 1)).sum(axis=0)
    predicted = pred.sum(axis=0)
    precision = ratio(tp, predicted)
    recall = ratio(tp, pos)
    f1 = ratio(2 * tp, predicted + pos)
    for values in (precision, recall, f1):
        values[pos == 0] = np.nan
    specificity = ratio(neg - (predicted - tp), neg)
    specificity[neg == 0] = np.nan

    unscored = [
        f"{name} ({unscored_reason(int(pos[j]), int(neg[j]))})"
        for j, name in enumerate(names)
        if pos[j] == 0 or neg[j] == 0
    ]
    if unscored:
        warnings.warn(
            f"per_class_metrics: {', '.join(unscored)} among {n} samples: AUROC/AP are NaN "
            f"(F1/precision/recall too without positives) and left out of the macro means",
            stacklevel=2,
        )

    per_class = {"auc": auc, "ap": ap, "f1": f1, "precision": precision, "recall": recall, "specificity": specificity}
    result: dict[str, Any] = {key: by_label(values, names) for key, values in per_class.items()}
    result["thresholds"] = by_label(t, names)
    for key, values in per_class.items():
        result[f"{key}_mean"] = nanmean(values)
    result["n"] = int(n)
    result["positives"] = {name: int(k) for name, k in zip(names, pos)}
    result["negatives"] = {name: int(k) for name, k in zip(names, neg)}
    result["known"] = {name: int(k) for name, k in zip(names, known.sum(axis=0))}
    return result


def unscored_reason(positives: int, negatives: int) -> str:
    """Why a class cannot be ranked: its known samples have no positives, no negatives, or none at all."""
    if positives == 0 and negatives == 0:
        return "unknown in every sample"
    return "no positives" if positives == 0 else "no negatives"


def tune_thresholds(
    probs: Any, targets: Any, metric: str = "f1", labels: Sequence[str] = LABELS
) -> np.ndarray:
    """Per class, the threshold with the highest F1 on this split's known labels; 0.5 for a class
    without known positives.

    Tune on the VALIDATION split only and apply the result to test: thresholds tuned on test make
    test F1 optimistic. Every operating point of the precision-recall curve is tried; the returned
    value is the probability of the best one, so ``probs >= t`` reproduces that F1 exactly (counts
    are exact integers here rather than torchmetrics' float32 precision/recall, so near-ties are
    decided correctly). Among equal F1 the highest threshold wins.
    """
    if metric not in THRESHOLD_METRICS:
        raise ChexdistError(f"threshold metric {metric!r} is not one of {list(THRESHOLD_METRICS)}")
    p, y, names = as_arrays(probs, targets, labels)
    out = np.full(len(names), DEFAULT_THRESHOLD)
    for j in range(len(names)):
        known = y[:, j] >= 0
        scores, positive = p[known, j], y[known, j]
        n_pos = int(positive.sum())
        if n_pos == 0:
            continue
        order, starts = tie_blocks(scores)
        ends = np.append(starts[1:], len(order))
        tp = np.cumsum(positive[order])[ends - 1]
        f1 = 2 * tp / (ends + n_pos)
        out[j] = scores[order[starts[int(np.argmax(f1))]]]
    return out


def curve_points(scores: Any, positive: Any) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall points of one class, one point per distinct score
    (``score >= t``), ROC starting at (0, 0). Needs at least one positive and one negative."""
    s = to_numpy(scores, "scores").reshape(-1)
    y = to_numpy(positive, "positive").reshape(-1) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ChexdistError(f"curve_points: needs positives and negatives, got {n_pos} and {n_neg}")
    order, starts = tie_blocks(s)
    ends = np.append(starts[1:], len(order))
    tp = np.cumsum(y[order])[ends - 1]
    fp = ends - tp
    return {
        "fpr": np.concatenate(([0.0], fp / n_neg)),
        "tpr": np.concatenate(([0.0], tp / n_pos)),
        "precision": tp / ends,
        "recall": tp / n_pos,
    }


def reliability(probs: Any, targets: Any, bins: int = 10, labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """Reliability (calibration) table per class over `bins` equal-width probability bins: count,
    mean predicted probability and observed positive rate per bin, and the expected calibration
    error ECE = sum over bins of count/N * |observed - predicted|."""
    p, y, names = as_arrays(probs, targets, labels)
    if not isinstance(bins, numbers.Integral) or bins < 1:
        raise ChexdistError(f"bins must be a positive integer, got {bins!r}")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    out: dict[str, Any] = {"bins": int(bins), "edges": np.linspace(0, 1, bins + 1).tolist(), "per_class": {}, "ece": {}}
    for j, name in enumerate(names):
        known = y[:, j] >= 0
        count = np.bincount(which[known, j], minlength=bins)
        mean_p = np.bincount(which[known, j], weights=p[known, j], minlength=bins)
        observed = np.bincount(which[known, j], weights=y[known, j].astype(np.float64), minlength=bins)
        mean_p = np.divide(mean_p, count, out=np.full(bins, np.nan), where=count > 0)
        observed = np.divide(observed, count, out=np.full(bins, np.nan), where=count > 0)
        filled = count > 0
        share = count[filled] / max(int(known.sum()), 1)
        out["ece"][name] = float((share * np.abs(observed[filled] - mean_p[filled])).sum()) if known.any() else float("nan")
        out["per_class"][name] = {"count": count.tolist(), "mean_prob": mean_p.tolist(), "observed": observed.tolist()}
    out["ece_mean"] = nanmean(np.asarray(list(out["ece"].values())))
    return out
