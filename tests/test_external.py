"""External validation: a model trained on synthetic NIH shards, scored on synthetic CheXpert shards,
scores exactly the findings CheXpert labels there (values = scikit-learn on the known samples),
keeps the NIH validation thresholds, lists what it could not score, and `--compare` works there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tests.conftest import REPO

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


@pytest.fixture(scope="module")
def nih_run(synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("external") / "run"
    cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(synth_shards), "--out", str(out),
           "--no-progress", "--set", "train.epochs=2", "--set", "data.image_size=48", "--set", "data.eval_resize=56"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        pytest.fail(f"training failed: {done.stderr[-2000:]}")
    return out


@pytest.fixture(scope="module")
def chexpert_shards(tmp_path_factory):
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synthlayouts import make_synthetic

    base = tmp_path_factory.mktemp("chexpert")
    make_synthetic(base / "raw", "chexpert", images=160, size=64, seed=7)
    settings = PackSettings(dataset="chexpert", split="official", size=64, shard_size=40)
    pack_dataset(base / "raw", base / "shards", settings, progress=False)
    return base / "shards"


def shard_labels(shards, split: str) -> dict[str, list]:
    out = {}
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())["labels"]
    return out


@pytest.mark.slow
def test_nih_model_on_chexpert_scores_exactly_the_known_findings(nih_run, chexpert_shards, tmp_path):
    from chexdist.evaluation.evaluate import compare_runs, evaluate_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_run(nih_run, split="test", shards=str(chexpert_shards), n_boot=100, progress=False, plots=False)
    labels = shard_labels(chexpert_shards, "test")
    preds = pd.read_csv(nih_run / "eval-test" / "predictions.csv", dtype={"image": str})
    assert sorted(preds["image"]) == sorted(labels)
    truth = np.array([[np.nan if v is None else v for v in labels[k]] for k in preds["image"]], dtype=float)
    scored = []
    for j, name in enumerate(LABELS):
        known = ~np.isnan(truth[:, j])
        entry = result["per_class"][name]
        assert (entry["positives"], entry["negatives"]) == (int((truth[:, j] == 1).sum()), int((truth[:, j] == 0).sum()))
        y = truth[known, j]
        if known.any() and 0 < y.sum() < len(y):
            scored.append(name)
            probs = preds[f"prob_{name}"].to_numpy()[known]
            assert entry["auc"]["value"] == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
            assert entry["ap"]["value"] == pytest.approx(average_precision_score(y, probs), abs=1e-6)
            assert entry["auc"]["ci_resamples"] > 0
        else:
            assert entry["auc"] is None and name in result["not_scored"]
    unlabelled = {"Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"}
    assert unlabelled <= set(result["not_scored"]) and not unlabelled & set(scored) and len(scored) >= 4
    assert all("not labelled" in result["not_scored"][name] for name in unlabelled)
    assert result["macro_over"]["auc"] == scored
    best = json.loads((nih_run / "best.json").read_text())
    assert {n: e["threshold"] for n, e in result["per_class"].items()} == pytest.approx(best["thresholds"])
    assert result["external"] == {"trained_on": "nih", "scored_on": "chexpert"}
    assert any("external validation" in note and "validation split (nih)" in note for note in result["notes"])
    report = (nih_run / "eval-test" / "report.md").read_text()
    assert "## Findings not scored" in report and "- Hernia: not labelled" in report

    twin = tmp_path / "twin"
    shutil.copytree(nih_run, twin)
    compared = compare_runs(nih_run, twin, split="test", n_boot=50, out=tmp_path / "cmp")
    for name in LABELS:
        e = compared["per_class"][name]
        if name in scored:
            assert e["diff"] == 0 and e["p_boot"] == 1.0 and 0 < e["resamples"] <= 50
        else:
            assert e["diff"] is None and "null_reason" in e
    assert "unknown on every image" in compared["per_class"]["Hernia"]["null_reason"]
