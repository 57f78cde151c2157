"""chexdist.evaluation.metrics against scikit-learn, brute force, and materialized bootstrap resamples."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.evaluation.metrics import (
    Resampler,
    bootstrap_ci,
    per_class_metrics,
    threshold_array,
    tune_thresholds,
)

C = len(LABELS)
CASES = ("random", "ties", "separable", "inverted", "constant")


def make_case(kind: str, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, 14] probabilities and targets; every class has at least one positive and one negative."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, C)) < np.linspace(0.05, 0.5, C)).astype(np.int64)
    y[0], y[1] = 1, 0
    noise = rng.random((n, C))
    if kind == "random":
        p = np.clip(0.35 * y + 0.65 * noise, 0, 1)
    elif kind == "ties":
        p = np.round(0.3 * y + 0.7 * noise, 1)
    elif kind == "separable":
        p = np.where(y == 1, 0.6 + 0.4 * noise, 0.4 * noise)
    elif kind == "inverted":
        p = np.where(y == 1, 0.4 * noise, 0.6 + 0.4 * noise)
    else:
        p = np.full((n, C), 0.3)
    return p, y


def sklearn_at(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "f1": f1_score(y, pred, zero_division=0),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
    }


def collect_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", CASES)
def test_per_class_metrics_match_sklearn(kind: str) -> None:
    p, y = make_case(kind)
    rng = np.random.default_rng(1)
    # Thresholds equal to observed scores exercise the `>=` edge, which matters under ties.
    t = np.array([rng.choice(p[:, j]) for j in range(C)])
    m, caught = collect_warnings(per_class_metrics, p, y, t)
    assert caught == []
    expected: dict[str, list[float]] = {k: [] for k in ("auc", "ap", "f1", "precision", "recall")}
    for j, name in enumerate(LABELS):
        expected["auc"].append(roc_auc_score(y[:, j], p[:, j]))
        expected["ap"].append(average_precision_score(y[:, j], p[:, j]))
        for key, value in sklearn_at(y[:, j], p[:, j] >= t[j]).items():
            expected[key].append(value)
        assert m["thresholds"][name] == t[j]
        assert m["positives"][name] == y[:, j].sum()
    for key, values in expected.items():
        assert list(m[key]) == list(LABELS)
        np.testing.assert_allclose([m[key][name] for name in LABELS], values, atol=1e-6, err_msg=key)
        assert m[f"{key}_mean"] == pytest.approx(np.mean(values), abs=1e-6)
    assert m["n"] == len(p)


def test_special_cases_have_known_values() -> None:
    # torchmetrics builds its curves in float32, hence 1e-6 rather than exact equality.
    p, y = make_case("separable")
    m = per_class_metrics(p, y)
    np.testing.assert_allclose(list(m["auc"].values()) + list(m["ap"].values()), 1.0, atol=1e-6)
    p, y = make_case("inverted")
    np.testing.assert_allclose(list(per_class_metrics(p, y)["auc"].values()), 0.0, atol=1e-6)
    p, y = make_case("constant")
    m = per_class_metrics(p, y)
    np.testing.assert_allclose(list(m["auc"].values()), 0.5, atol=1e-6)
    np.testing.assert_allclose(list(m["ap"].values()), y.mean(axis=0), atol=1e-6)


def test_no_predicted_positives_scores_zero() -> None:
    p, y = make_case("random")
    p = p * 0.9
    m = per_class_metrics(p, y, thresholds=1.0)
    assert set(m["f1"].values()) == set(m["precision"].values()) == set(m["recall"].values()) == {0.0}
    assert f1_score(y[:, 0], p[:, 0] >= 1.0, zero_division=0) == 0.0


def test_unscorable_classes_are_nan_with_one_warning_and_left_out_of_means() -> None:
    p, y = make_case("random")
    y[:, LABELS.index("Hernia")] = 0
    y[:, LABELS.index("Effusion")] = 1
    m, caught = collect_warnings(per_class_metrics, p, y)
    assert len(caught) == 1
    assert "Hernia (no positives)" in caught[0] and "Effusion (no negatives)" in caught[0]
    for key in ("auc", "ap", "f1", "precision", "recall"):
        assert math.isnan(m[key]["Hernia"])
    assert math.isnan(m["auc"]["Effusion"]) and math.isnan(m["ap"]["Effusion"])
    j = LABELS.index("Effusion")
    assert m["f1"]["Effusion"] == pytest.approx(f1_score(y[:, j], p[:, j] >= 0.5), abs=1e-12)

    scorable = [j for j, name in enumerate(LABELS) if name not in ("Hernia", "Effusion")]
    auc = [roc_auc_score(y[:, j], p[:, j]) for j in scorable]
    assert m["auc_mean"] == pytest.approx(np.mean(auc), abs=1e-6)
    with_positives = [j for j, name in enumerate(LABELS) if name != "Hernia"]
    f1 = [f1_score(y[:, j], p[:, j] >= 0.5) for j in with_positives]
    assert m["f1_mean"] == pytest.approx(np.mean(f1), abs=1e-12)
    assert m["positives"]["Hernia"] == 0


def test_result_is_plain_json() -> None:
    p, y = make_case("ties")
    m = per_class_metrics(torch.from_numpy(p), torch.from_numpy(y))
    assert json.loads(json.dumps(m)) == m


def test_torch_inputs_match_numpy() -> None:
    p, y = make_case("random")
    p = p.astype(np.float32)
    from_numpy = per_class_metrics(p, y)
    from_torch = per_class_metrics(torch.from_numpy(p), torch.from_numpy(y).bool())
    assert from_torch == from_numpy


def test_threshold_forms_agree() -> None:
    values = np.linspace(0.1, 0.9, C)
    as_dict = {name: float(v) for name, v in zip(reversed(LABELS), reversed(values))}
    for form in (values, list(values), torch.from_numpy(values), as_dict):
        np.testing.assert_array_equal(threshold_array(form), values)
    np.testing.assert_array_equal(threshold_array(0.3), np.full(C, 0.3))
    np.testing.assert_array_equal(threshold_array(None), np.full(C, 0.5))
    np.testing.assert_array_equal(threshold_array({"a": 0.2, "b": 0.7}, labels=("a", "b")), [0.2, 0.7])


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ({name: 0.5 for name in LABELS[:-1]}, "missing labels \\['Hernia'\\]"),
        ({**{name: 0.5 for name in LABELS}, "Infiltrate": 0.5}, "unknown labels \\['Infiltrate'\\]"),
        ([0.5] * (C - 1), "expected 14 values"),
        (1.5, "in \\[0, 1\\]"),
        ("high", "not a numeric array"),
    ],
)
def test_bad_thresholds_are_refused(thresholds, message: str) -> None:
    p, y = make_case("random", n=20)
    with pytest.raises(ChexdistError, match=message):
        per_class_metrics(p, y, thresholds)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, y: (p * 4 - 2, y), "sigmoid"),
        (lambda p, y: (np.where(p > 0.9, np.nan, p), y), "NaN for"),
        (lambda p, y: (p, y * 2), "other than 0/1"),
        (lambda p, y: (p, y[:-1]), "differs from probs shape"),
        (lambda p, y: (p[:, :3], y[:, :3]), "3 classes but 14 label names"),
        (lambda p, y: (p[:, 0], y[:, 0]), "expected shape \\[N, 14\\]"),
        (lambda p, y: (p[:0], y[:0]), "no samples"),
    ],
)
def test_bad_inputs_are_refused(change, message: str) -> None:
    p, y = change(*make_case("random", n=50))
    with pytest.raises(ChexdistError, match=message):
        per_class_metrics(p, y)
    with pytest.raises(ChexdistError, match=message):
        tune_thresholds(p, y)


@pytest.mark.parametrize("kind", ["random", "ties", "separable", "constant"])
def test_tuned_threshold_maximizes_f1(kind: str) -> None:
    p, y = make_case(kind, n=300, seed=3)
    t = tune_thresholds(p, y)
    tuned_f1 = per_class_metrics(p, y, t)["f1"]
    for j, name in enumerate(LABELS):
        assert t[j] in p[:, j]
        at_t = f1_score(y[:, j], p[:, j] >= t[j])
        assert tuned_f1[name] == pytest.approx(at_t, abs=1e-12)
        scores = np.unique(p[:, j])
        scan = np.concatenate([[0.0, 1.0], scores, (scores[1:] + scores[:-1]) / 2])
        pred = p[:, j, None] >= scan
        tp = (pred & (y[:, j, None] == 1)).sum(axis=0)
        scan_f1 = 2 * tp / (pred.sum(axis=0) + y[:, j].sum())
        assert at_t >= scan_f1.max() - 1e-12


def test_tuning_without_positives_keeps_default_and_rejects_unknown_metric() -> None:
    p, y = make_case("random")
    y[:, 5] = 0
    t = tune_thresholds(p, y)
    assert t[5] == 0.5 and np.all(t[np.arange(C) != 5] != 0.5)
    with pytest.raises(ChexdistError, match="youden"):
        tune_thresholds(p, y, metric="youden")


def patient_case(n_patients: int, per_patient: int, seed: int = 0, jitter: float = 0.01):
    """Images of one patient share labels and nearly share scores: strongly clustered data."""
    rng = np.random.default_rng(seed)
    y_patient = (rng.random((n_patients, C)) < 0.3).astype(np.int64)
    y_patient[0], y_patient[1] = 1, 0
    score = np.clip(0.25 * y_patient + 0.75 * rng.random((n_patients, C)), 0, 1)
    groups = np.repeat(np.arange(n_patients), per_patient)
    p = np.clip(score[groups] + jitter * rng.standard_normal((len(groups), C)), 0, 1)
    return p, y_patient[groups], groups


def test_resampler_equals_sklearn_on_materialized_resamples() -> None:
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 5, size=12)
    groups = np.repeat(np.arange(12), sizes)
    n = len(groups)
    y = (rng.random((n, C)) < 0.4).astype(np.int64)
    p = np.round(0.3 * y + 0.7 * rng.random((n, C)), 1)
    t = np.full(C, 0.5)
    counts = np.vstack(
        [
            np.ones(12, dtype=np.int64),
            [2, 0, 0, 3, 1, 0, 0, 2, 0, 1, 3, 0],
            rng.multinomial(12, np.full(12, 1 / 12), size=6),
        ]
    )
    out = Resampler(p, y, groups, t)(counts)
    for b, row in enumerate(counts):
        idx = np.repeat(np.arange(n), row[groups])
        for j in range(C):
            yb, pb = y[idx, j], p[idx, j]
            if 0 < yb.sum() < len(yb):
                assert out["auc"][b, j] == pytest.approx(roc_auc_score(yb, pb), abs=1e-12)
                assert out["ap"][b, j] == pytest.approx(average_precision_score(yb, pb), abs=1e-12)
            else:
                assert math.isnan(out["auc"][b, j]) and math.isnan(out["ap"][b, j])
            if yb.sum() > 0:
                assert out["f1"][b, j] == pytest.approx(f1_score(yb, pb >= 0.5), abs=1e-12)
            else:
                assert math.isnan(out["f1"][b, j])


def test_bootstrap_ci_contains_point_estimate() -> None:
    p, y, groups = patient_case(400, 3, jitter=0.1)
    t = tune_thresholds(p, y)
    point = per_class_metrics(p, y, t)
    ci = bootstrap_ci(p, y, groups, t, n_boot=300)
    assert ci["n_boot"] == 300 and ci["level"] == 0.95 and ci["n_groups"] == 400
    for key in ("auc", "ap", "f1"):
        for name in LABELS:
            lo, hi = ci[key][name]
            assert lo <= point[key][name] <= hi, (key, name)
            assert ci["n_used"][key][name] == 300
        lo, hi = ci[f"{key}_mean"]
        assert lo < point[f"{key}_mean"] < hi
        assert hi - lo < 0.1
    narrower = bootstrap_ci(p, y, groups, t, n_boot=300, level=0.5)
    assert narrower["auc_mean"][1] - narrower["auc_mean"][0] < ci["auc_mean"][1] - ci["auc_mean"][0]


@pytest.mark.filterwarnings("ignore:bootstrap_ci")
def test_bootstrap_resamples_patients_not_images() -> None:
    p, y, groups = patient_case(40, 25)
    by_patient = bootstrap_ci(p, y, groups, n_boot=200)
    by_image = bootstrap_ci(p, y, np.arange(len(p)), n_boot=200)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_patient["auc_mean"]) > 2.5 * width(by_image["auc_mean"])
    wider = [width(by_patient["auc"][n]) > 2 * width(by_image["auc"][n]) for n in LABELS]
    assert sum(wider) >= C - 1


def test_bootstrap_skips_resamples_without_positives() -> None:
    n_patients, n_boot = 30, 2000
    p, y, groups = patient_case(n_patients, 10)
    rare, absent = LABELS.index("Hernia"), LABELS.index("Edema")
    y[:, rare] = groups == 5
    y[:, absent] = 0
    ci, caught = collect_warnings(bootstrap_ci, p, y, groups, n_boot=n_boot)
    assert len(caught) == 1 and "Hernia" in caught[0] and "Edema (0/2000)" in caught[0]
    # Patient 5 is missing from a resample of 30 patient draws with probability (29/30)^30; were
    # images drawn instead, one of its 10 images would almost surely be drawn.
    expected = n_boot * (1 - (1 - 1 / n_patients) ** n_patients)
    assert abs(ci["n_used"]["auc"]["Hernia"] - expected) < 100
    assert ci["n_used"]["f1"]["Hernia"] == ci["n_used"]["auc"]["Hernia"]
    assert ci["n_used"]["auc"]["Edema"] == 0 and all(math.isnan(v) for v in ci["auc"]["Edema"])
    assert ci["n_used"]["auc_mean"] == n_boot
    assert ci["n_used"]["auc"]["Atelectasis"] == n_boot


def test_bootstrap_is_deterministic_per_seed_and_accepts_string_ids() -> None:
    p, y, groups = patient_case(50, 4, jitter=0.1)
    first = bootstrap_ci(p, y, groups, n_boot=100, seed=3)
    assert json.dumps(first) == json.dumps(bootstrap_ci(p, y, groups, n_boot=100, seed=3))
    assert json.dumps(first) != json.dumps(bootstrap_ci(p, y, groups, n_boot=100, seed=4))
    # Zero-padded strings sort like the integers, so they map to the same groups and draws.
    names = np.array([f"patient{g:04d}" for g in groups])
    assert json.dumps(first) == json.dumps(bootstrap_ci(p, y, names.tolist(), n_boot=100, seed=3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": np.arange(10)}, "one id per sample"),
        ({"n_boot": 0}, "positive integer"),
        ({"level": 1.0}, "level must be in"),
        ({"level": "95%"}, "level must be in"),
        ({"groups": [None, 3] * 25}, "all numbers or all strings"),
    ],
)
def test_bootstrap_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    p, y = make_case("random", n=50)
    args = {"groups": np.arange(50), **kwargs}
    with pytest.raises(ChexdistError, match=message):
        bootstrap_ci(p, y, **args)


def test_bootstrap_at_a_real_test_splits_size() -> None:
    """10,000 images of 3,400 patients, 1000 resamples: every resample scores every finding (its speed
    is `chexdist bench`'s business, not a wall-clock assert on a shared machine)."""
    p, y, groups = patient_case(3400, 3, jitter=0.1)
    p, y, groups = p[:10_000], y[:10_000], groups[:10_000]
    ci = bootstrap_ci(p, y, groups, n_boot=1000)
    assert ci["n_groups"] == 3334 and all(ci["n_used"]["auc"][name] == 1000 for name in LABELS)
    assert all(lo <= hi for lo, hi in ci["auc"].values())


# ------------------------------------------------------------------ comparison, curves, calibration


def brute_force_delong(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: psi over all m*n positive/negative pairs, O(m n)."""
    x, z = scores[:, y == 1], scores[:, y == 0]
    psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])  # [k, m, n]
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    m, n = x.shape[1], z.shape[1]
    return psi.mean(axis=(1, 2)), np.cov(v10) / m + np.cov(v01) / n


def test_fast_delong_matches_the_definition_and_sklearn() -> None:
    from chexdist.evaluation.metrics import delong_auc_cov

    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    a = np.round(0.4 * y + rng.random(300), 1)  # ties on purpose
    b = np.round(0.2 * y + 0.6 * a + 0.4 * rng.random(300), 2)
    aucs, cov = delong_auc_cov(np.stack([a, b]), y)
    ref_aucs, ref_cov = brute_force_delong(np.stack([a, b]), y)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, a), roc_auc_score(y, b)], atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)


def test_delong_test_agrees_with_paired_bootstrap() -> None:
    from chexdist.evaluation.metrics import delong_test, paired_bootstrap_auc

    rng = np.random.default_rng(4)
    n = 1500
    y = (rng.random((n, C)) < 0.2).astype(np.int64)
    y[:2], y[2:4] = 1, 0
    a = np.clip(0.25 * y + 0.75 * rng.random((n, C)), 0, 1)
    b = np.clip(0.6 * a + 0.1 * y + 0.3 * rng.random((n, C)), 0, 1)
    test = delong_test(a, b, y)
    boot = paired_bootstrap_auc(a, b, y, np.arange(n), n_boot=1000, seed=1)
    for j, name in enumerate(LABELS):
        diff = roc_auc_score(y[:, j], b[:, j]) - roc_auc_score(y[:, j], a[:, j])
        assert test[name]["diff"] == pytest.approx(diff, abs=1e-12)
        assert boot["per_class"][name]["diff"] == pytest.approx(diff, abs=1e-12)
        # Image-level bootstrap SE of the difference ~ DeLong's SE (both estimate the same variance).
        lo, hi = boot["per_class"][name]["ci"]
        assert (hi - lo) / (2 * 1.96) == pytest.approx(test[name]["se"], rel=0.2), name
        assert 0 <= test[name]["p"] <= 1
    same = paired_bootstrap_auc(a, a, y, np.arange(n), n_boot=50)
    assert same["macro"]["diff"] == 0 and same["macro"]["ci"] == [0.0, 0.0] and same["macro"]["p_boot"] == 1.0
    assert delong_test(a, a, y)["Atelectasis"]["p"] == 1.0


def test_paired_bootstrap_resamples_patients() -> None:
    from chexdist.evaluation.metrics import paired_bootstrap_auc

    p, y, groups = patient_case(40, 20)
    q = np.clip(p + 0.05 * np.random.default_rng(2).standard_normal(p.shape), 0, 1)
    by_patient = paired_bootstrap_auc(p, q, y, groups, n_boot=300)
    by_image = paired_bootstrap_auc(p, q, y, np.arange(len(p)), n_boot=300)
    width = lambda e: e["ci"][1] - e["ci"][0]  # noqa: E731
    assert by_patient["macro"]["diff"] == by_image["macro"]["diff"]
    assert width(by_patient["macro"]) > 1.5 * width(by_image["macro"])


def test_precision_recall_specificity_resampled_like_sklearn() -> None:
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(10), 3)
    y = (rng.random((30, C)) < 0.4).astype(np.int64)
    p = rng.random((30, C))
    counts = rng.multinomial(10, np.full(10, 0.1), size=5)
    out = Resampler(p, y, groups, np.full(C, 0.5))(counts)
    for b, row in enumerate(counts):
        idx = np.repeat(np.arange(30), row[groups])
        for j in range(C):
            yb, pred = y[idx, j], p[idx, j] >= 0.5
            if yb.sum():
                assert out["precision"][b, j] == pytest.approx(precision_score(yb, pred, zero_division=0), abs=1e-12)
                assert out["recall"][b, j] == pytest.approx(recall_score(yb, pred), abs=1e-12)
            if (yb == 0).sum():
                assert out["specificity"][b, j] == pytest.approx(recall_score(1 - yb, ~pred), abs=1e-12)


def test_curve_points_and_reliability_match_sklearn() -> None:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    from chexdist.evaluation.metrics import curve_points, reliability

    p, y = make_case("ties")
    pts = curve_points(p[:, 3], y[:, 3])
    fpr, tpr, _ = roc_curve(y[:, 3], p[:, 3], drop_intermediate=False)
    np.testing.assert_allclose(pts["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(pts["tpr"], tpr, atol=1e-12)
    assert auc(pts["fpr"], pts["tpr"]) == pytest.approx(roc_auc_score(y[:, 3], p[:, 3]), abs=1e-12)
    precision, recall, _ = precision_recall_curve(y[:, 3], p[:, 3])
    np.testing.assert_allclose(pts["precision"][::-1], precision[:-1], atol=1e-12)
    np.testing.assert_allclose(pts["recall"][::-1], recall[:-1], atol=1e-12)

    p, y = make_case("random")
    rel = reliability(p, y, bins=10)
    observed, predicted = calibration_curve(y[:, 5], p[:, 5], n_bins=10)
    ours = rel["per_class"][LABELS[5]]
    kept = [i for i, c in enumerate(ours["count"]) if c]
    np.testing.assert_allclose(np.array(ours["observed"])[kept], observed, atol=1e-12)
    np.testing.assert_allclose(np.array(ours["mean_prob"])[kept], predicted, atol=1e-12)
    counts = np.array(ours["count"])[kept]
    assert rel["ece"][LABELS[5]] == pytest.approx((counts / len(p) * np.abs(observed - predicted)).sum(), abs=1e-12)


@pytest.mark.filterwarnings("ignore:bootstrap_ci")
def test_bca_resamples_patients_like_scipy_with_an_independent_statistic() -> None:
    """Our BCa = scipy.stats.bootstrap(method="BCa") over patient indices, with sklearn's AUROC of the
    materialized resample (all images of each drawn patient) as the statistic."""
    from scipy.stats import bootstrap

    p, y, groups = patient_case(30, 3, jitter=0.1)
    ours = bootstrap_ci(p, y, groups, n_boot=200, seed=5, method="bca")
    assert ours["method"] == "bca" and ours["n_used"]["auc"][LABELS[0]] == 200

    def auc_of_patients(patients: np.ndarray) -> float:
        idx = np.concatenate([np.flatnonzero(groups == g) for g in patients])
        return roc_auc_score(y[idx, 0], p[idx, 0])

    reference = bootstrap((np.arange(30),), auc_of_patients, vectorized=False, n_resamples=200, batch=32,
                          method="BCa", random_state=5)
    np.testing.assert_allclose(ours["auc"][LABELS[0]], list(reference.confidence_interval), atol=1e-9)
    percentile = bootstrap_ci(p, y, groups, n_boot=200, seed=5)
    assert ours["auc"][LABELS[0]] != percentile["auc"][LABELS[0]]
    with pytest.raises(ChexdistError, match="CI method 'normal'"):
        bootstrap_ci(p, y, groups, n_boot=10, method="normal")
