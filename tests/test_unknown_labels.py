"""Unknown labels (NaN targets, null in a shard's json): losses and metrics use the known ones only,
checked against hand formulas and scikit-learn on the known samples."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, UNKNOWN


def batch_with_unknowns(seed: int = 0, n: int = 6, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    targets = (torch.rand(n, c, generator=g) < 0.4).float()
    targets[torch.rand(n, c, generator=g) < 0.35] = UNKNOWN
    targets[:, -1] = UNKNOWN  # one class unknown everywhere
    return logits, targets


def hand_terms(logits: torch.Tensor, targets: torch.Tensor, kind: str, pos_weight=None, gamma=2.0, alpha=None):
    """Per-term losses written out from the definitions, in Python floats; None where unknown."""
    out = []
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            y = float(targets[i, j])
            if math.isnan(y):
                continue
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            w = 1.0 if pos_weight is None else float(pos_weight[j])
            if kind in ("bce", "wbce"):
                out.append(-(w * y * math.log(p) + (1 - y) * math.log(1 - p)))
            else:
                pt = p if y == 1 else 1 - p
                a = 1.0 if alpha is None else (alpha if y == 1 else 1 - alpha) if alpha < 1 else alpha
                out.append(-a * (1 - pt) ** gamma * math.log(pt))
    return out


@pytest.mark.parametrize("kind", ["bce", "wbce", "focal", "focal-balanced"])
def test_masked_losses_equal_the_hand_mean_over_known_terms(kind):
    from chexdist.training.losses import build_loss

    logits, targets = batch_with_unknowns()
    pos_weight = torch.tensor([2.0, 0.5, 3.0, 1.5])
    if kind == "wbce":
        loss, terms = build_loss("wbce", pos_weight=pos_weight), hand_terms(logits, targets, "wbce", pos_weight)
    elif kind == "bce":
        loss, terms = build_loss("bce"), hand_terms(logits, targets, "bce")
    else:
        alpha = 0.25 if kind == "focal-balanced" else None
        loss, terms = build_loss("focal", gamma=2.0, alpha=alpha), hand_terms(logits, targets, "focal", alpha=alpha)
    x = logits.clone().requires_grad_(True)
    value = loss(x, targets)
    assert float(value.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    value.backward()
    unknown = torch.isnan(targets)
    assert torch.all(x.grad[unknown] == 0) and torch.all(x.grad[~unknown] != 0)


def test_all_unknown_batch_gives_zero_with_a_graph():
    from chexdist.training.losses import build_loss

    x = torch.randn(3, 14, requires_grad=True)
    value = build_loss("bce")(x, torch.full((3, 14), UNKNOWN))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.all(x.grad == 0)


def test_wbce_pos_weight_counts_known_labels_only():
    from chexdist.training.losses import pos_weight_from_counts

    positives = dict.fromkeys(LABELS, 10)
    negatives = dict.fromkeys(LABELS, 30)
    negatives["Mass"] = 0  # unknown in every image: neutral 1
    w = pos_weight_from_counts(positives, total=100, negatives=negatives)
    assert w[LABELS.index("Atelectasis")] == pytest.approx(3.0)  # 30 known negatives / 10, not 90 / 10
    assert w[LABELS.index("Mass")] == pytest.approx(1.0)
    assert pos_weight_from_counts(positives, total=100)[0] == pytest.approx(9.0)  # format 1: all non-positives


def scored_data(seed=1, n=300):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 14)) < 0.3).astype(float)
    p = np.clip(0.5 * y + 0.6 * rng.random((n, 14)), 0, 1)
    y[rng.random((n, 14)) < 0.3] = np.nan
    y[:, LABELS.index("Hernia")] = np.nan
    groups = rng.integers(0, 80, n)
    return p, y, groups


def test_masked_metrics_equal_sklearn_on_the_known_samples():
    from chexdist.evaluation.metrics import per_class_metrics, tune_thresholds

    p, y, _ = scored_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = tune_thresholds(p, y)
        m = per_class_metrics(p, y, t)
    assert any("Hernia (unknown in every sample)" in str(w.message) for w in caught)
    for j, name in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        if not known.any():
            assert math.isnan(m["auc"][name]) and math.isnan(m["f1"][name]) and m["known"][name] == 0
            continue
        yk, pk = y[known, j].astype(int), p[known, j]
        assert m["auc"][name] == pytest.approx(roc_auc_score(yk, pk), abs=1e-6)
        assert m["ap"][name] == pytest.approx(average_precision_score(yk, pk), abs=1e-6)
        assert m["f1"][name] == pytest.approx(f1_score(yk, pk >= t[j]), abs=1e-12)
        # the tuned threshold is the best F1 over every cut of the known samples
        best = max(f1_score(yk, pk >= c) for c in np.unique(pk))
        assert f1_score(yk, pk >= t[j]) == pytest.approx(best, abs=1e-12)
        assert m["positives"][name] + m["negatives"][name] == known.sum()
    assert m["auc_mean"] == pytest.approx(np.mean([m["auc"][n] for n in LABELS[:-1]]))


def test_bootstrap_ranks_known_samples_only():
    """Every resample's per-class AUROC equals sklearn's on that resample's known samples."""
    from chexdist.evaluation.bootstrap import Resampler
    from chexdist.evaluation.metrics import bootstrap_ci

    p, y, groups = scored_data(seed=2, n=120)
    group_index = np.unique(groups, return_inverse=True)[1]
    targets = np.where(np.isnan(y), -1, y).astype(np.int64)
    sampler = Resampler(p, targets, group_index, np.full(14, 0.5))
    counts = np.random.default_rng(5).integers(0, 3, size=(4, group_index.max() + 1))
    aucs = sampler(counts)["auc"]
    for b in range(len(counts)):
        weights = counts[b][group_index]
        for j in range(13):
            keep = (~np.isnan(y[:, j])) & (weights > 0)
            yk = np.repeat(y[keep, j], weights[keep])
            if 0 < yk.sum() < len(yk):
                assert aucs[b, j] == pytest.approx(roc_auc_score(yk, np.repeat(p[keep, j], weights[keep])), abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = bootstrap_ci(p, y, groups, n_boot=50)
    assert ci["n_used"]["auc"]["Hernia"] == 0 and math.isnan(ci["auc"]["Hernia"][0])
    assert ci["n_used"]["auc"]["Atelectasis"] == 50


def test_paired_bootstrap_p_value_is_never_zero():
    from chexdist.evaluation.metrics import paired_bootstrap_auc

    rng = np.random.default_rng(0)
    y = (rng.random((200, 14)) < 0.5).astype(float)
    good, bad = np.clip(0.8 * y + 0.2 * rng.random(y.shape), 0, 1), rng.random(y.shape)
    result = paired_bootstrap_auc(bad, good, y, np.arange(200), n_boot=99)
    assert result["macro"]["p_boot"] == pytest.approx(2 / 100) and result["macro"]["p_floor"] == pytest.approx(2 / 100)
    from chexdist.evaluation.evaluate import p_text

    assert p_text(result["macro"]["p_boot"], 99) == "<= 0.02 (B=99)"


def test_parse_labels_reads_null_as_unknown():
    from chexdist.data.samples import parse_labels

    labels = [1, 0, None] + [0] * 11
    tensor, _ = parse_labels({"json": json.dumps({"labels": labels}).encode()})
    assert tensor[0] == 1 and tensor[1] == 0 and torch.isnan(tensor[2]) and tensor.dtype == torch.float32
    with pytest.raises(ChexdistError, match="null"):
        parse_labels({"json": json.dumps({"labels": [2] + [0] * 13}).encode()})
