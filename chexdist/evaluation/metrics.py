"""Per-class AUROC/AP/F1 (torchmetrics), F1-optimal thresholds, and patient-level bootstrap CIs.

Conventions shared by every function here:

- ``probs`` and ``targets`` are [N, C] (numpy, torch or nested lists); probabilities must already be
  in [0, 1] (torchmetrics would silently apply a sigmoid to anything else, so we refuse it).
- A finding is predicted positive when ``prob >= threshold``.
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

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

THRESHOLD_METRICS: tuple[str, ...] = ("f1",)
CI_METHODS: tuple[str, ...] = ("percentile", "bca")
"""``bootstrap_ci(method=...)``: percentile (no extra dependency) or BCa (scipy.stats.bootstrap)."""
"""Values accepted by ``tune_thresholds(metric=...)`` (config key ``eval.threshold_metric``)."""

DEFAULT_THRESHOLD = 0.5
_BOOT_METRICS = ("auc", "ap", "f1", "precision", "recall", "specificity")
_BOOT_CHUNK = 32  # resamples per vectorized block; fixed so draws never depend on data size


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ChexdistError(f"{name}: not a numeric array ({e})") from None


def _check_labels(labels: Sequence[str], n_classes: int) -> list[str]:
    labels = list(labels)
    if len(labels) != n_classes:
        raise ChexdistError(f"got {n_classes} classes but {len(labels)} label names")
    if len(set(labels)) != len(labels):
        raise ChexdistError(f"duplicate label names in {labels}")
    return labels


def _as_arrays(probs: Any, targets: Any, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate and convert to float64 probabilities and int64 0/1 targets, both [N, C]."""
    p = _to_numpy(probs, "probs")
    y = _to_numpy(targets, "targets")
    if p.ndim != 2:
        raise ChexdistError(f"probs: expected shape [N, {len(labels)}], got {list(p.shape)}")
    if y.shape != p.shape:
        raise ChexdistError(f"targets shape {list(y.shape)} differs from probs shape {list(p.shape)}")
    if p.shape[0] == 0:
        raise ChexdistError("probs: no samples")
    names = _check_labels(labels, p.shape[1])
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        cls = names[int(np.nonzero(bad.any(axis=0))[0][0])]
        raise ChexdistError(f"probs: values outside [0, 1] or NaN for {cls}; pass sigmoid(logits), not logits")
    not_binary = (y != 0) & (y != 1)
    if not_binary.any():
        cls = names[int(np.nonzero(not_binary.any(axis=0))[0][0])]
        raise ChexdistError(f"targets: values other than 0/1 for {cls}")
    return p, y.astype(np.int64), names


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
        values = _to_numpy([thresholds[name] for name in labels], "thresholds")
    elif isinstance(thresholds, numbers.Real):
        values = np.full(len(labels), float(thresholds))
    else:
        values = _to_numpy(thresholds, "thresholds")
        if values.ndim == 0:
            values = np.full(len(labels), float(values))
    if values.shape != (len(labels),):
        raise ChexdistError(f"thresholds: expected {len(labels)} values, got shape {list(values.shape)}")
    if not (np.isfinite(values) & (values >= 0) & (values <= 1)).all():
        raise ChexdistError(f"thresholds: every value must be in [0, 1], got {values.tolist()}")
    return values


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's RuntimeWarning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _by_label(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(labels, values)}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def per_class_metrics(
    probs: Any, targets: Any, thresholds: Any = None, labels: Sequence[str] = LABELS
) -> dict[str, Any]:
    """Per-class AUROC, AP, and F1/precision/recall/specificity at ``thresholds``, plus NaN-ignoring macro means.

    Thresholds default to 0.5; for honest test numbers pass the ones ``tune_thresholds`` found on the
    validation split. Classes that cannot be scored are NaN (see the module docstring) and trigger
    exactly one warning naming them. The result holds only floats, ints, strings and dicts, so it can
    go straight into ``metrics.json`` / ``best.json``.
    """
    p, y, names = _as_arrays(probs, targets, labels)
    t = threshold_array(thresholds, names)
    n = p.shape[0]
    pos = y.sum(axis=0)
    neg = n - pos

    auc = np.full(len(names), np.nan)
    ap = np.full(len(names), np.nan)
    scored = np.nonzero((pos > 0) & (neg > 0))[0]
    p_t, y_t = torch.from_numpy(p), torch.from_numpy(y)
    for j in scored:
        auc[j] = float(binary_auroc(p_t[:, j], y_t[:, j], validate_args=False))
        ap[j] = float(binary_average_precision(p_t[:, j], y_t[:, j], validate_args=False))

    pred = p >= t
    tp = (pred & (y == 1)).sum(axis=0)
    predicted = pred.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, pos)
    f1 = _ratio(2 * tp, predicted + pos)
    for values in (precision, recall, f1):
        values[pos == 0] = np.nan
    specificity = _ratio(neg - (predicted - tp), neg)
    specificity[neg == 0] = np.nan

    unscored = [
        f"{name} (no {'positives' if pos[j] == 0 else 'negatives'})"
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
    result: dict[str, Any] = {key: _by_label(values, names) for key, values in per_class.items()}
    result["thresholds"] = _by_label(t, names)
    for key, values in per_class.items():
        result[f"{key}_mean"] = _nanmean(values)
    result["n"] = int(n)
    result["positives"] = {name: int(k) for name, k in zip(names, pos)}
    return result


def _tie_blocks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order by descending score and the start index of each run of equal scores in that order.

    Every distinct score is one operating point of the ROC/PR curve (``score >= t``), so per-block
    sums of (weighted) positives and negatives are all the curves need.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.concatenate(([0], np.nonzero(ranked[1:] != ranked[:-1])[0] + 1))
    return order, starts


def tune_thresholds(
    probs: Any, targets: Any, metric: str = "f1", labels: Sequence[str] = LABELS
) -> np.ndarray:
    """Per class, the threshold with the highest F1 on this split; 0.5 for a class without positives.

    Tune on the VALIDATION split only and apply the result to test: thresholds tuned on test make
    test F1 optimistic. Every operating point of the precision-recall curve is tried; the returned
    value is the probability of the best one, so ``probs >= t`` reproduces that F1 exactly (counts
    are exact integers here rather than torchmetrics' float32 precision/recall, so near-ties are
    decided correctly). Among equal F1 the highest threshold wins.
    """
    if metric not in THRESHOLD_METRICS:
        raise ChexdistError(f"threshold metric {metric!r} is not one of {list(THRESHOLD_METRICS)}")
    p, y, names = _as_arrays(probs, targets, labels)
    out = np.full(len(names), DEFAULT_THRESHOLD)
    for j in range(len(names)):
        n_pos = int(y[:, j].sum())
        if n_pos == 0:
            continue
        order, starts = _tie_blocks(p[:, j])
        ends = np.append(starts[1:], len(order))
        tp = np.cumsum(y[order, j])[ends - 1]
        f1 = 2 * tp / (ends + n_pos)
        out[j] = p[order[starts[int(np.argmax(f1))]], j]
    return out


def _ranking(
    scores: np.ndarray, positive: np.ndarray, group_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What ``Resampler`` needs of one class, independent of the draws.

    Returns the groups of the positives in rank order, where each tie block with a positive starts
    among them, the groups of the negatives in rank order, and per such block how many negatives
    rank strictly above it and at or above it.
    """
    order, starts = _tie_blocks(scores)
    block = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(order))))
    is_pos = positive[order]
    neg_in_block = np.bincount(block[~is_pos], minlength=len(starts))
    pos_block = block[is_pos]
    first = np.flatnonzero(np.diff(pos_block, prepend=-1))
    through = np.cumsum(neg_in_block)[pos_block[first]]
    above = through - neg_in_block[pos_block[first]]
    ranked_groups = group_index[order]
    return ranked_groups[is_pos], first, ranked_groups[~is_pos], above, through


class Resampler:
    """AUROC, AP, F1, precision, recall and specificity [B, C] of B resamples given as how often each group was drawn ([B, G]).

    Drawing a group k times is the same as repeating its images k times, so each resample is the
    original data with integer weights, and the metrics are sums over tie blocks that contain a
    positive: the block's positive weight, and the negative weight ranked at or above the block
    (a cumulative sum over the negatives, read at the block's edges). That is two passes over the
    images per class and resample chunk instead of materializing B datasets; everything that does
    not depend on the draws is prepared once. Invalid cells (no positives, or for AUROC/AP no
    negatives) are NaN.
    """

    def __init__(
        self, probs: np.ndarray, targets: np.ndarray, group_index: np.ndarray, thresholds: np.ndarray
    ) -> None:
        n_groups = int(group_index.max()) + 1
        positive = targets == 1
        pred = probs >= thresholds

        def per_group(mask: np.ndarray) -> np.ndarray:
            out = np.zeros((n_groups, probs.shape[1]))
            np.add.at(out, group_index, mask.astype(np.float64))
            return out

        self.pos, self.neg = per_group(positive), per_group(~positive)
        self.tp, self.predicted = per_group(pred & positive), per_group(pred)
        self.classes = [_ranking(probs[:, j], positive[:, j], group_index) for j in range(probs.shape[1])]

    def __call__(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        counts = counts.astype(np.float64)
        pos, neg = counts @ self.pos, counts @ self.neg
        tp, predicted = counts @ self.tp, counts @ self.predicted
        f1 = np.where(pos > 0, _ratio(2 * tp, predicted + pos), np.nan)
        precision = np.where(pos > 0, _ratio(tp, predicted), np.nan)
        recall = np.where(pos > 0, _ratio(tp, pos), np.nan)
        specificity = np.where(neg > 0, _ratio(neg - (predicted - tp), neg), np.nan)
        auc = np.full(pos.shape, np.nan)
        ap = np.full(pos.shape, np.nan)
        for j, (pos_groups, pos_starts, neg_groups, neg_above, neg_through) in enumerate(self.classes):
            rows = np.nonzero((pos[:, j] > 0) & (neg[:, j] > 0))[0]
            if rows.size == 0:
                continue
            w = counts if rows.size == len(counts) else counts[rows]
            block_pos = np.add.reduceat(np.take(w, pos_groups, axis=1), pos_starts, axis=1)
            cum_neg = np.zeros((len(rows), len(neg_groups) + 1))
            np.cumsum(np.take(w, neg_groups, axis=1), axis=1, out=cum_neg[:, 1:])
            above, through = cum_neg[:, neg_above], cum_neg[:, neg_through]
            n_pos, n_neg = pos[rows, j], neg[rows, j]
            # A positive outranks the negatives below its block and ties with half of those in it.
            wins = (block_pos * (n_neg[:, None] - 0.5 * (above + through))).sum(axis=1)
            auc[rows, j] = wins / (n_pos * n_neg)
            cum_pos = np.cumsum(block_pos, axis=1)
            ap[rows, j] = (block_pos * _ratio(cum_pos, cum_pos + through)).sum(axis=1) / n_pos
        return {"auc": auc, "ap": ap, "f1": f1, "precision": precision, "recall": recall, "specificity": specificity}


def _draw_counts(seed: int, n_boot: int, n_groups: int):
    """Chunks [rows, G] of how often each group is drawn, B resamples of G draws with replacement."""
    rng = np.random.default_rng(seed)
    for first in range(0, n_boot, _BOOT_CHUNK):
        rows = min(_BOOT_CHUNK, n_boot - first)
        draws = rng.integers(0, n_groups, size=(rows, n_groups))
        offsets = np.arange(rows)[:, None] * n_groups
        yield np.bincount((draws + offsets).ravel(), minlength=rows * n_groups).reshape(rows, n_groups)


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Per row, the mean of the non-NaN entries (NaN for an all-NaN row)."""
    kept = ~np.isnan(values)
    return np.divide(np.nansum(values, axis=1), kept.sum(axis=1), out=np.full(len(values), np.nan), where=kept.any(axis=1))


def _percentile_interval(values: np.ndarray, level: float) -> tuple[list[float], int]:
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return [float("nan"), float("nan")], 0
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(kept, [tail, 100 - tail])
    return [float(lo), float(hi)], int(kept.size)


def _group_index(groups: Any, n: int, n_boot: Any, level: Any) -> np.ndarray:
    """Checked bootstrap arguments; group ids mapped to 0..G-1 (sorted ids, so draws are stable)."""
    g = np.asarray(groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ChexdistError(f"groups: expected one id per sample ({n}), got shape {list(g.shape)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ChexdistError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ChexdistError(f"level must be in (0, 1), got {level!r}")
    try:
        return np.unique(g, return_inverse=True)[1].reshape(-1)
    except TypeError as e:
        raise ChexdistError(f"groups: ids must be all numbers or all strings ({e})") from None


def bootstrap_mean_ci(
    values: Any, groups: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean of per-sample `values` (e.g. pointing-game hits, IoUs) with a percentile bootstrap CI
    that resamples GROUPS (patients), as `bootstrap_ci` does for AUROC. None when there are no values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    group_index = _group_index(groups, v.size, n_boot, level)
    if v.size == 0:
        return {"value": None, "ci": None, "n": 0, "groups": 0}
    if not np.isfinite(v).all():
        raise ChexdistError("bootstrap_mean_ci: values must be finite")
    n_groups = int(group_index.max()) + 1
    sums = np.bincount(group_index, weights=v, minlength=n_groups)
    sizes = np.bincount(group_index, minlength=n_groups).astype(np.float64)
    means = [(counts @ sums) / (counts @ sizes) for counts in _draw_counts(seed, n_boot, n_groups)]
    ci, _ = _percentile_interval(np.concatenate(means), level)
    return {"value": float(v.mean()), "ci": ci, "n": int(v.size), "groups": n_groups}


def bootstrap_ci(
    probs: Any,
    targets: Any,
    groups: Any,
    thresholds: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    labels: Sequence[str] = LABELS,
    method: str = "percentile",
) -> dict[str, Any]:
    """Bootstrap CIs for per-class AUROC, AP, F1/precision/recall/specificity (at fixed thresholds)
    and their macro means: percentile (default) or BCa (``method="bca"``, see :func:`_bca_intervals`).

    Resamples GROUPS (patient IDs), not images: images of one patient are correlated, and resampling
    them independently gives intervals that are too narrow. Each resample draws as many groups as
    there are, with replacement; a patient drawn twice contributes all of its images twice.
    A resample in which a class has no positives (for AUROC/AP also: no negatives) is skipped for
    that class; a macro mean averages the classes scorable in that resample. ``n_used`` reports how
    many resamples each interval rests on, and one warning names the classes that lost any.
    Deterministic for a given seed.
    """
    if method not in CI_METHODS:
        raise ChexdistError(f"CI method {method!r} is not one of {list(CI_METHODS)}")
    p, y, names = _as_arrays(probs, targets, labels)
    t = threshold_array(thresholds, names)
    group_index = _group_index(groups, p.shape[0], n_boot, level)
    n_groups = int(group_index.max()) + 1
    resampled = Resampler(p, y, group_index, t)
    if method == "bca":
        result, n_used = _bca_intervals(resampled, n_groups, n_boot, seed, level, names)
        result.update(n_boot=int(n_boot), level=float(level), seed=int(seed), n_groups=n_groups, n_used=n_used, method=method)
        return result

    chunks: dict[str, list[np.ndarray]] = {key: [] for key in _BOOT_METRICS}
    for counts in _draw_counts(seed, n_boot, n_groups):
        for key, values in resampled(counts).items():
            chunks[key].append(values)

    result: dict[str, Any] = {}
    n_used: dict[str, Any] = {}
    for key in _BOOT_METRICS:
        values = np.concatenate(chunks[key])
        result[key], n_used[key] = {}, {}
        for j, name in enumerate(names):
            result[key][name], n_used[key][name] = _percentile_interval(values[:, j], level)
        means = _row_nanmean(values)
        result[f"{key}_mean"], n_used[f"{key}_mean"] = _percentile_interval(means, level)

    short = [f"{name} ({n_used['auc'][name]}/{n_boot})" for name in names if n_used["auc"][name] < n_boot]
    if short:
        warnings.warn(
            f"bootstrap_ci: resamples without positives or negatives skipped for {', '.join(short)}",
            stacklevel=2,
        )
    result.update(n_boot=int(n_boot), level=float(level), seed=int(seed), n_groups=n_groups, n_used=n_used, method=method)
    return result


def _counts_from_indices(indices: np.ndarray, n_groups: int) -> np.ndarray:
    """[B, G'] drawn group indices -> [B, G] how often each group was drawn."""
    rows = len(indices)
    offsets = np.arange(rows)[:, None] * n_groups
    return np.bincount((indices + offsets).ravel(), minlength=rows * n_groups).reshape(rows, n_groups)


def _bca_intervals(resampled: Resampler, n_groups: int, n_boot: int, seed: int, level: float,
                   names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """BCa intervals from scipy.stats.bootstrap, resampling PATIENTS: the data handed to scipy are
    the patient indices, so its resamples and its jackknife (leave one patient out) are patient-level,
    and the statistic scores each as integer weights with the same vectorized resampler. BCa needs
    every resample and every jackknife sample to be scorable: an output with any that is not (a class
    whose positives sit in few patients) gets a NaN interval, and ``n_used`` says how many resamples
    were scorable."""
    try:
        from scipy.stats import bootstrap
    except ImportError:
        raise ChexdistError("BCa intervals need scipy: pip install 'chexdist[bca]' (or use the percentile method)") from None
    width = len(names) + 1

    def statistic(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        indices = np.asarray(indices)
        lead = indices.shape[:-1]
        values = resampled(_counts_from_indices(indices.reshape(-1, indices.shape[-1]), n_groups))
        columns = [np.column_stack([values[key], _row_nanmean(values[key])]) for key in _BOOT_METRICS]
        return np.moveaxis(np.concatenate(columns, axis=1).reshape(*lead, -1), -1, 0)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        res = bootstrap((np.arange(n_groups),), statistic, vectorized=True, n_resamples=n_boot, batch=_BOOT_CHUNK,
                        method="BCa", confidence_level=level, random_state=seed)
    low, high = res.confidence_interval
    used = (~np.isnan(res.bootstrap_distribution)).sum(axis=-1)
    result: dict[str, Any] = {}
    n_used: dict[str, Any] = {}
    for k, key in enumerate(_BOOT_METRICS):
        result[key], n_used[key] = {}, {}
        for j, name in enumerate([*names, None]):
            col = k * width + j
            interval = [float(low[col]), float(high[col])]
            if name is None:
                result[f"{key}_mean"], n_used[f"{key}_mean"] = interval, int(used[col])
            else:
                result[key][name], n_used[key][name] = interval, int(used[col])
    return result, n_used


def paired_bootstrap_auc(
    probs_a: Any,
    probs_b: Any,
    targets: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    labels: Sequence[str] = LABELS,
) -> dict[str, Any]:
    """Paired patient bootstrap of AUROC(B) - AUROC(A) on the same images, per class and macro.

    Both models are scored on the SAME resampled patients in every resample, so the interval of
    the difference reflects only how the models differ, not which patients happened to be drawn.
    ``p_boot`` is the two-sided bootstrap p-value 2 * min(P(diff <= 0), P(diff >= 0)) (capped at 1):
    a rough companion to the interval; DeLong's test (:func:`delong_test`) gives an analytic one
    that assumes independent images.
    """
    pa, y, names = _as_arrays(probs_a, targets, labels)
    pb, _, _ = _as_arrays(probs_b, targets, labels)
    group_index = _group_index(groups, pa.shape[0], n_boot, level)
    n_groups = int(group_index.max()) + 1
    t = threshold_array(None, names)
    model_a, model_b = Resampler(pa, y, group_index, t), Resampler(pb, y, group_index, t)
    ones = np.ones((1, n_groups), dtype=np.int64)
    point_a, point_b = model_a(ones)["auc"][0], model_b(ones)["auc"][0]
    diffs = []
    for counts in _draw_counts(seed, n_boot, n_groups):
        diffs.append(model_b(counts)["auc"] - model_a(counts)["auc"])
    d = np.concatenate(diffs)
    macro = _row_nanmean(d)

    def summary(values: np.ndarray, point: float) -> dict[str, Any]:
        interval, used = _percentile_interval(values, level)
        kept = values[~np.isnan(values)]
        p_boot = float(min(1.0, 2 * min((kept <= 0).mean(), (kept >= 0).mean()))) if kept.size else float("nan")
        return {"diff": float(point), "ci": interval, "p_boot": p_boot, "n_used": used}

    per_class = {name: summary(d[:, j], point_b[j] - point_a[j]) for j, name in enumerate(names)}
    for j, name in enumerate(names):
        per_class[name].update(auc_a=float(point_a[j]), auc_b=float(point_b[j]))
    valid = ~np.isnan(point_a) & ~np.isnan(point_b)
    macro_point = float((point_b[valid] - point_a[valid]).mean()) if valid.any() else float("nan")
    return {
        "per_class": per_class,
        "macro": {**summary(macro, macro_point), "auc_a": _nanmean(point_a), "auc_b": _nanmean(point_b)},
        "n_boot": int(n_boot), "level": float(level), "seed": int(seed), "n_groups": n_groups,
    }


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of each row of x [k, n], ties sharing their mean rank."""
    out = np.empty(x.shape)
    for r, row in enumerate(x):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        before = np.cumsum(counts) - counts
        out[r] = (before + (counts + 1) / 2)[inverse]
    return out


def delong_auc_cov(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs [k] of k score vectors [k, n] against one 0/1 truth, and their DeLong covariance [k, k].

    The fast algorithm of Sun & Xu (2014, IEEE Signal Process. Lett. 21:1389): the structural
    components of DeLong et al. (1988) come from midranks within the positives, within the
    negatives and overall, in O(n log n) instead of O(m n) comparisons.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(positive).astype(bool)
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    if m < 2 or n < 2:
        raise ChexdistError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    tx, ty = _midranks(x), _midranks(y)
    tz = _midranks(np.concatenate([x, y], axis=1))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v_pos = (tz[:, :m] - tx) / n
    v_neg = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return aucs, cov


def delong_test(probs_a: Any, probs_b: Any, targets: Any, labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """DeLong's test of AUROC(B) - AUROC(A) per class on the same images (two-sided, normal).

    It treats images as independent, which images of one patient are not; read it beside the
    paired patient bootstrap. A class with fewer than 2 positives or negatives is NaN.
    """
    pa, y, names = _as_arrays(probs_a, targets, labels)
    pb, _, _ = _as_arrays(probs_b, targets, labels)
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        pos = int(y[:, j].sum())
        if pos < 2 or len(y) - pos < 2:
            out[name] = {"diff": float("nan"), "se": float("nan"), "z": float("nan"), "p": float("nan")}
            continue
        aucs, cov = delong_auc_cov(np.stack([pa[:, j], pb[:, j]]), y[:, j])
        var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        diff = float(aucs[1] - aucs[0])
        if var <= 0:
            z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
        else:
            z = diff / math.sqrt(var)
            p = math.erfc(abs(z) / math.sqrt(2))
        out[name] = {"diff": diff, "se": math.sqrt(max(var, 0.0)), "z": float(z), "p": float(p)}
    return out


def curve_points(scores: Any, positive: Any) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall points of one class, one point per distinct score
    (``score >= t``), ROC starting at (0, 0). Needs at least one positive and one negative."""
    s = _to_numpy(scores, "scores").reshape(-1)
    y = _to_numpy(positive, "positive").reshape(-1) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ChexdistError(f"curve_points: needs positives and negatives, got {n_pos} and {n_neg}")
    order, starts = _tie_blocks(s)
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
    p, y, names = _as_arrays(probs, targets, labels)
    if not isinstance(bins, numbers.Integral) or bins < 1:
        raise ChexdistError(f"bins must be a positive integer, got {bins!r}")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    out: dict[str, Any] = {"bins": int(bins), "edges": np.linspace(0, 1, bins + 1).tolist(), "per_class": {}, "ece": {}}
    for j, name in enumerate(names):
        count = np.bincount(which[:, j], minlength=bins)
        mean_p = np.bincount(which[:, j], weights=p[:, j], minlength=bins)
        observed = np.bincount(which[:, j], weights=y[:, j].astype(np.float64), minlength=bins)
        mean_p = np.divide(mean_p, count, out=np.full(bins, np.nan), where=count > 0)
        observed = np.divide(observed, count, out=np.full(bins, np.nan), where=count > 0)
        filled = count > 0
        out["ece"][name] = float((count[filled] / len(p) * np.abs(observed[filled] - mean_p[filled])).sum())
        out["per_class"][name] = {"count": count.tolist(), "mean_prob": mean_p.tolist(), "observed": observed.tolist()}
    out["ece_mean"] = float(np.mean(list(out["ece"].values())))
    return out
