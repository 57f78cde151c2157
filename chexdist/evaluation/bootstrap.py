"""Patient-level bootstrap (percentile or BCa) CIs, the paired bootstrap of two models, and DeLong's test.

Targets follow :mod:`chexdist.evaluation.arrays`: an unknown target (NaN) takes part in no class
where it is unknown, so each class's resamples rank only its known samples.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from chexdist.errors import ChexdistError
from chexdist.evaluation.arrays import as_arrays, nanmean, ratio, threshold_array, tie_blocks
from chexdist.labels import LABELS

CI_METHODS: tuple[str, ...] = ("percentile", "bca")
"""``bootstrap_ci(method=...)``: percentile (no extra dependency) or BCa (scipy.stats.bootstrap)."""
_BOOT_METRICS = ("auc", "ap", "f1", "precision", "recall", "specificity")
_BOOT_CHUNK = 32  # resamples per vectorized block; fixed so draws never depend on data size


def _ranking(
    scores: np.ndarray, positive: np.ndarray, group_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What ``Resampler`` needs of one class, independent of the draws.

    Returns the groups of the positives in rank order, where each tie block with a positive starts
    among them, the groups of the negatives in rank order, and per such block how many negatives
    rank strictly above it and at or above it.
    """
    order, starts = tie_blocks(scores)
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
        positive, negative = targets == 1, targets == 0
        known = positive | negative
        pred = (probs >= thresholds) & known

        def per_group(mask: np.ndarray) -> np.ndarray:
            out = np.zeros((n_groups, probs.shape[1]))
            np.add.at(out, group_index, mask.astype(np.float64))
            return out

        self.pos, self.neg = per_group(positive), per_group(negative)
        self.tp, self.predicted = per_group(pred & positive), per_group(pred)
        self.classes = [_ranking(probs[known[:, j], j], positive[known[:, j], j], group_index[known[:, j]])
                        for j in range(probs.shape[1])]

    def __call__(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        counts = counts.astype(np.float64)
        pos, neg = counts @ self.pos, counts @ self.neg
        tp, predicted = counts @ self.tp, counts @ self.predicted
        f1 = np.where(pos > 0, ratio(2 * tp, predicted + pos), np.nan)
        precision = np.where(pos > 0, ratio(tp, predicted), np.nan)
        recall = np.where(pos > 0, ratio(tp, pos), np.nan)
        specificity = np.where(neg > 0, ratio(neg - (predicted - tp), neg), np.nan)
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
            ap[rows, j] = (block_pos * ratio(cum_pos, cum_pos + through)).sum(axis=1) / n_pos
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
    p, y, names = as_arrays(probs, targets, labels)
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
    ``p_boot`` is the two-sided bootstrap p-value 2 * (min(#(diff <= 0), #(diff >= 0)) + 1) / (B + 1)
    (capped at 1; B = the resamples that could score the class): the add-one form never reports 0,
    because B resamples cannot show a p-value below about 1/B (``p_floor`` is that bound):
    a rough companion to the interval; DeLong's test (:func:`delong_test`) gives an analytic one
    that assumes independent images.
    """
    pa, y, names = as_arrays(probs_a, targets, labels)
    pb, _, _ = as_arrays(probs_b, targets, labels)
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
        k = min(int((kept <= 0).sum()), int((kept >= 0).sum()))
        p_boot = float(min(1.0, 2 * (k + 1) / (kept.size + 1))) if kept.size else float("nan")
        p_floor = float(min(1.0, 2 / (kept.size + 1))) if kept.size else float("nan")
        return {"diff": float(point), "ci": interval, "p_boot": p_boot, "p_floor": p_floor, "n_used": used}

    per_class = {name: summary(d[:, j], point_b[j] - point_a[j]) for j, name in enumerate(names)}
    for j, name in enumerate(names):
        per_class[name].update(auc_a=float(point_a[j]), auc_b=float(point_b[j]))
    valid = ~np.isnan(point_a) & ~np.isnan(point_b)
    macro_point = float((point_b[valid] - point_a[valid]).mean()) if valid.any() else float("nan")
    return {
        "per_class": per_class,
        "macro": {**summary(macro, macro_point), "auc_a": nanmean(point_a), "auc_b": nanmean(point_b)},
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
    pa, y, names = as_arrays(probs_a, targets, labels)
    pb, _, _ = as_arrays(probs_b, targets, labels)
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        known = y[:, j] >= 0
        pos, neg = int((y[:, j] == 1).sum()), int((y[:, j] == 0).sum())
        if pos < 2 or neg < 2:
            out[name] = {"diff": float("nan"), "se": float("nan"), "z": float("nan"), "p": float("nan")}
            continue
        aucs, cov = delong_auc_cov(np.stack([pa[known, j], pb[known, j]]), y[known, j])
        var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        diff = float(aucs[1] - aucs[0])
        if var <= 0:
            z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
        else:
            z = diff / math.sqrt(var)
            p = math.erfc(abs(z) / math.sqrt(2))
        out[name] = {"diff": diff, "se": math.sqrt(max(var, 0.0)), "z": float(z), "p": float(p)}
    return out


