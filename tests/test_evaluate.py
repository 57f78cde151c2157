"""`chexdist evaluate`, `--compare` and `import-checkpoint` on a real tiny model trained in this session:
metrics against scikit-learn, val-tuned (never test-tuned) thresholds, patient CIs, strict JSON,
2 real processes through `accelerate launch`, CheXNet-format import, and one-line refusals."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from chexdist.training.launcher import free_port
from chexdist.cli.main import main
from chexdist.evaluation.evaluate import read_predictions, summarize
from chexdist.labels import LABELS
from chexdist.evaluation.metrics import bootstrap_ci, tune_thresholds
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path}: non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def evaluate(*args: str) -> int:
    return main(["evaluate", "--no-progress", *args])


@pytest.fixture(scope="module")
def evaluated(trained_run: Path, tmp_path_factory) -> Path:
    """The shared run evaluated once on test (and on val), in a copy this module may change."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    assert evaluate("--run", str(run), "--bootstrap", "300") == 0
    assert evaluate("--run", str(run), "--split", "val", "--bootstrap", "0", "--no-plots") == 0
    return run


@pytest.mark.filterwarnings("ignore:bootstrap_ci")
def test_report_files_and_metrics_match_sklearn(evaluated: Path, eval_shards: Path):
    out = evaluated / "eval-test"
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "per_class.csv", "predictions.csv", "report.md",
                                               "roc.png", "pr.png", "calibration.png"}
    metrics = strict_json(out / "metrics.json")
    best = json.loads((evaluated / "best.json").read_text())
    manifest = json.loads((eval_shards / "manifest.json").read_text())
    preds = read_predictions(out / "predictions.csv")
    p, y = preds["probs"], preds["targets"]
    assert len(preds["keys"]) == len(set(preds["keys"])) == manifest["splits"]["test"]["samples"] == metrics["samples"]
    assert metrics["patients"] == manifest["splits"]["test"]["patients"] == len(set(preds["patients"].tolist()))
    assert y.sum(axis=0).tolist() == [manifest["splits"]["test"]["positives"][n] for n in LABELS]

    for j, name in enumerate(LABELS):
        entry = metrics["per_class"][name]
        t = best["thresholds"][name]
        assert entry["threshold"] == t
        pred = p[:, j] >= t
        assert entry["auc"]["value"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-5)
        assert entry["ap"]["value"] == pytest.approx(average_precision_score(y[:, j], p[:, j]), abs=1e-5)
        assert entry["f1"]["value"] == pytest.approx(f1_score(y[:, j], pred, zero_division=0), abs=1e-9)
        assert entry["precision"]["value"] == pytest.approx(precision_score(y[:, j], pred, zero_division=0), abs=1e-9)
        assert entry["recall"]["value"] == pytest.approx(recall_score(y[:, j], pred), abs=1e-9)
        specificity = ((~pred) & (y[:, j] == 0)).sum() / (y[:, j] == 0).sum()
        assert entry["specificity"]["value"] == pytest.approx(specificity, abs=1e-9)
        lo, hi = entry["auc"]["ci"]
        assert lo <= entry["auc"]["value"] <= hi
    aucs = [roc_auc_score(y[:, j], p[:, j]) for j in range(len(LABELS))]
    assert metrics["macro"]["auc"]["value"] == pytest.approx(np.mean(aucs), abs=1e-5)
    assert metrics["macro"]["auc"]["value"] > 0.7  # the synthetic motifs are learnable

    # The CIs are the patient bootstrap of metrics.py with the recorded seed, on these predictions.
    ci = bootstrap_ci(p, y, preds["patients"], best["thresholds"], n_boot=300, seed=0)
    assert metrics["bootstrap"] == {"method": "percentile", "resampling": "patients", "n_boot": 300, "level": 0.95,
                                    "seed": 0, "patients": metrics["patients"]}
    for name in LABELS:
        assert metrics["per_class"][name]["f1"]["ci"] == pytest.approx(ci["f1"][name])
    assert metrics["macro"]["auc"]["ci"] == pytest.approx(ci["auc_mean"])

    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["label"] for r in rows] == [*LABELS, "macro"]
    assert float(rows[0]["auc"]) == pytest.approx(aucs[0], abs=1e-5)
    report = (out / "report.md").read_text()
    assert "VALIDATION" in report and "Not a test result" in report
    assert "0.8094" in report and "arXiv:2505.06646" in report and "Split:" in report


def test_predictions_are_the_models_outputs_on_the_shard_images(evaluated: Path, eval_shards: Path):
    """predictions.csv rows, recomputed independently: decode the shard image, eval transform, model."""
    from chexdist.data.samples import decode_gray
    from chexdist.evaluation.inference import load_run
    from chexdist.data.shardformat import iter_tar

    run = load_run(evaluated)
    preds = read_predictions(evaluated / "eval-test" / "predictions.csv")
    row_of = {k: i for i, k in enumerate(preds["keys"])}
    shard = json.loads((eval_shards / "manifest.json").read_text())["splits"]["test"]["shards"][0]["name"]
    checked = 0
    for sample in iter_tar(str(eval_shards / shard), take=6):
        meta = json.loads(sample["json"])
        image = run.transform(decode_gray(sample["png"]))
        with torch.no_grad():
            probs = torch.sigmoid(run.model(image[None]))[0].numpy()
        i = row_of[sample["__key__"]]
        np.testing.assert_allclose(preds["probs"][i], probs, atol=1e-6)
        assert preds["targets"][i].tolist() == meta["labels"] and preds["patients"][i] == meta["patient_id"]
        checked += 1
    assert checked == 6


def test_thresholds_are_tuned_on_validation_not_test(evaluated: Path, tmp_path: Path):
    """Fails if evaluate tuned its thresholds on test: they must be best.json's, which are the F1
    optimum on the VALIDATION predictions, and the test F1 must be the one at those thresholds."""
    best = json.loads((evaluated / "best.json").read_text())
    val = read_predictions(evaluated / "eval-val" / "predictions.csv")
    test = read_predictions(evaluated / "eval-test" / "predictions.csv")
    metrics = strict_json(evaluated / "eval-test" / "metrics.json")
    val_tuned = tune_thresholds(val["probs"], val["targets"])
    test_tuned = tune_thresholds(test["probs"], test["targets"])
    np.testing.assert_allclose([best["thresholds"][n] for n in LABELS], val_tuned, rtol=0, atol=1e-6)
    np.testing.assert_allclose([metrics["per_class"][n]["threshold"] for n in LABELS], val_tuned, rtol=0, atol=1e-6)
    assert not np.allclose(val_tuned, test_tuned), "val and test optima coincide: the test cannot tell them apart"
    honest = [metrics["per_class"][n]["f1"]["value"] for n in LABELS if metrics["per_class"][n]["f1"]]
    optimistic = metrics["optimistic_test_tuned"]
    assert optimistic["f1_mean"] > metrics["macro"]["f1"]["value"]
    assert all(optimistic["f1"][n] >= metrics["per_class"][n]["f1"]["value"] - 1e-12 for n in LABELS)
    assert metrics["macro"]["f1"]["value"] == pytest.approx(np.mean(honest))
    assert "optimistic" in strict_json(evaluated / "eval-val" / "metrics.json")["notes"][0]

    # And the thresholds really are read from best.json: change them, and F1 follows.
    run = tmp_path / "run"
    shutil.copytree(evaluated, run, ignore=shutil.ignore_patterns("eval-*"))
    best["thresholds"] = {n: 0.37 for n in LABELS}
    (run / "best.json").write_text(json.dumps(best))
    assert evaluate("--run", str(run), "--bootstrap", "0", "--no-plots") == 0
    changed = strict_json(run / "eval-test" / "metrics.json")
    j = LABELS.index("Effusion")
    expected = f1_score(test["targets"][:, j], test["probs"][:, j] >= 0.37, zero_division=0)
    assert changed["per_class"]["Effusion"]["f1"]["value"] == pytest.approx(expected, abs=1e-9)
    assert changed["bootstrap"] is None and changed["per_class"]["Effusion"]["f1"].get("ci") is None


def test_bootstrap_and_level_default_to_the_runs_eval_config(evaluated: Path, tmp_path: Path):
    """Without --bootstrap/--level, the run's own eval.bootstrap and eval.ci_level are used."""
    run = tmp_path / "run"
    shutil.copytree(evaluated, run, ignore=shutil.ignore_patterns("eval-*"))
    best = json.loads((run / "best.json").read_text())
    best["config"]["eval"].update(bootstrap=40, ci_level=0.8)
    (run / "best.json").write_text(json.dumps(best))
    assert evaluate("--run", str(run), "--no-plots") == 0
    metrics = strict_json(run / "eval-test" / "metrics.json")
    assert (metrics["bootstrap"]["n_boot"], metrics["bootstrap"]["level"]) == (40, 0.8)
    assert evaluate("--run", str(run), "--no-plots", "--bootstrap", "30", "--level", "0.9") == 0
    metrics = strict_json(run / "eval-test" / "metrics.json")
    assert (metrics["bootstrap"]["n_boot"], metrics["bootstrap"]["level"]) == (30, 0.9)
    assert evaluate("--run", str(run), "--no-plots", "--level", "95") == 2


def test_class_without_positives_is_null_with_reason_and_patient_cis_are_wider():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), 8)
    y = (rng.random((30, len(LABELS))) < 0.3).astype(np.int64)[patients]
    p = np.clip(0.3 * y + 0.7 * rng.random((30, len(LABELS)))[patients] + 0.02 * rng.standard_normal(y.shape), 0, 1)
    y[:, LABELS.index("Hernia")] = 0
    by_patient = summarize(p, y, patients, 0.5, n_boot=300)
    by_image = summarize(p, y, np.arange(len(y)), 0.5, n_boot=300)
    hernia = by_patient["per_class"]["Hernia"]
    assert hernia["auc"] is None and hernia["f1"] is None and hernia["positives"] == 0
    assert hernia["null_reasons"]["auc"] == "no positives in this split: undefined"
    assert hernia["specificity"]["value"] == pytest.approx(float((p[:, -1] < 0.5).mean()))
    assert "Hernia" not in by_patient["macro_over"]["auc"]
    text = json.dumps({k: v for k, v in by_patient.items() if not k.startswith("_")}, allow_nan=False)
    assert "NaN" not in text
    width = lambda e: e["ci"][1] - e["ci"][0]  # noqa: E731
    assert width(by_patient["macro"]["auc"]) > 2 * width(by_image["macro"]["auc"])
    bca = summarize(p, y, patients, 0.5, n_boot=200, ci_method="bca")
    assert bca["bootstrap"]["method"] == "bca" and bca["per_class"]["Hernia"]["auc"] is None
    lo, hi = bca["macro"]["auc"]["ci"]
    assert lo < bca["macro"]["auc"]["value"] < hi and (lo, hi) != tuple(by_patient["macro"]["auc"]["ci"])


def test_import_chexnet_checkpoint_gives_identical_outputs_and_evaluates(eval_shards: Path, tmp_path: Path, capsys):
    import torchvision

    from chexdist.evaluation.inference import load_run

    torch.manual_seed(0)
    reference = torchvision.models.densenet121(weights=None)
    reference.classifier = torch.nn.Sequential(torch.nn.Linear(1024, len(LABELS)), torch.nn.Sigmoid())
    reference.eval()
    old_names = {}
    for key, value in reference.state_dict().items():
        key = key.replace("norm1", "norm.1").replace("relu1", "relu.1").replace("conv1", "conv.1") \
                 .replace("norm2", "norm.2").replace("relu2", "relu.2").replace("conv2", "conv.2") \
            if ".denselayer" in key else key
        old_names["module.densenet121." + key] = value
    assert any(".norm.1." in k for k in old_names) and "module.densenet121.classifier.0.weight" in old_names
    src = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "state_dict": old_names}, src)

    out = tmp_path / "chexnet"
    assert main(["import-checkpoint", str(src), "--arch", "densenet121", "--out", str(out), "--image-size", "64",
                 "--eval-resize", "64"]) == 0
    info = json.loads((out / "best.json").read_text())
    assert info["thresholds_tuned"] is False and set(info["thresholds"].values()) == {0.5}
    run = load_run(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.sigmoid(run.model(x)), reference(x))
    assert main(["import-checkpoint", str(src), "--out", str(out)]) == 2
    assert "nothing is overwritten" in capsys.readouterr().err

    assert evaluate("--run", str(out), "--shards", str(eval_shards), "--bootstrap", "20", "--no-plots") == 0
    metrics = strict_json(out / "eval-test" / "metrics.json")
    assert metrics["thresholds_tuned"] is False and "not tuned" in metrics["notes"][0]
    assert metrics["samples"] == json.loads((eval_shards / "manifest.json").read_text())["splits"]["test"]["samples"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(trained_run: Path, eval_shards: Path, tmp_path: Path, capsys):
    assert evaluate("--run", str(tmp_path / "missing")) == 2
    assert "missing: no such run folder" in one_line_error(capsys)

    bare = tmp_path / "bare.safetensors"
    shutil.copy(trained_run / "best.safetensors", bare)
    assert evaluate("--run", str(trained_run), "--checkpoint", str(bare)) == 2
    assert "no bare.json beside it" in one_line_error(capsys)

    swapped = tmp_path / "swapped"
    shutil.copytree(trained_run, swapped, ignore=shutil.ignore_patterns("checkpoints"))
    best = json.loads((swapped / "best.json").read_text())
    best["labels"][0], best["labels"][1] = best["labels"][1], best["labels"][0]
    (swapped / "best.json").write_text(json.dumps(best))
    assert evaluate("--run", str(swapped)) == 2
    assert "label order differs" in one_line_error(capsys) and not (swapped / "eval-test").exists()

    assert evaluate("--run", str(trained_run), "--split", "holdout") == 2
    assert "no split 'holdout'" in one_line_error(capsys)
    assert evaluate("--run", str(trained_run), "--shards", str(tmp_path)) == 2
    assert "no manifest" in one_line_error(capsys)


def test_compare_paired_bootstrap_and_delong(evaluated: Path, tmp_path: Path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(evaluated, other, ignore=shutil.ignore_patterns("eval-*"))
    weights = load_file(other / "best.safetensors")
    head = [k for k in weights if k.endswith("weight") and weights[k].shape[0] == len(LABELS)][-1]
    weights[head] = weights[head] + 0.5 * torch.randn_like(weights[head])
    save_file(weights, other / "best.safetensors", metadata={"labels": json.dumps(list(LABELS))})
    assert evaluate("--run", str(other), "--bootstrap", "0", "--no-plots") == 0
    capsys.readouterr()

    assert evaluate("--compare", str(evaluated), str(other), "--bootstrap", "300") == 0
    assert "b - a =" in capsys.readouterr().out
    result = strict_json(other / f"compare-test-vs-{evaluated.name}" / "compare.json")
    a = strict_json(evaluated / "eval-test" / "metrics.json")
    b = strict_json(other / "eval-test" / "metrics.json")
    assert result["images"] == a["samples"]
    for name in LABELS:
        e = result["per_class"][name]
        assert e["auc_a"] == pytest.approx(a["per_class"][name]["auc"]["value"], abs=1e-6)
        assert e["auc_b"] == pytest.approx(b["per_class"][name]["auc"]["value"], abs=1e-6)
        assert e["diff"] == pytest.approx(e["auc_b"] - e["auc_a"], abs=1e-12)
        assert e["ci"][0] <= e["diff"] <= e["ci"][1] and 0 <= e["delong"]["p"] <= 1
    assert result["macro"]["diff"] == pytest.approx(b["macro"]["auc"]["value"] - a["macro"]["auc"]["value"], abs=1e-6)

    rows = (other / "eval-test" / "predictions.csv").read_text().splitlines()
    (other / "eval-test" / "predictions.csv").write_text("\n".join(rows[:-1]) + "\n")
    assert evaluate("--compare", str(evaluated), str(other)) == 2
    assert "were scored on different images (1 only in the first, e.g. " in one_line_error(capsys)


@pytest.mark.slow
def test_two_process_launch_writes_the_same_metrics(evaluated: Path, tmp_path: Path):
    out = tmp_path / "eval2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "-m", "chexdist.cli", "evaluate", "--run", str(evaluated), "--bootstrap", "300",
           "--no-progress", "--no-plots", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only the main process reports and writes
    one = strict_json(evaluated / "eval-test" / "metrics.json")
    two = strict_json(out / "metrics.json")
    assert two.pop("world_size") == 2 and one.pop("world_size") == 1
    for key in ("figures",):
        one.pop(key), two.pop(key)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert (out / "predictions.csv").read_text() == (evaluated / "eval-test" / "predictions.csv").read_text()
    assert math.isfinite(two["macro"]["auc"]["value"])
