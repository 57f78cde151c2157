"""What a new user meets: the full NIH metadata table against the 70 real images (--only-present,
unscorable splits), a run that cannot be scored, progress in a log file, strict JSON in every file of a
run, resume with only --out, and the help texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chexdist.config import config_keys
from chexdist.utils.fileio import append_jsonl, atomic_write_json, dumps_json, loads_strict
from chexdist.labels import LABELS
from tests.conftest import REAL_CSV, REAL_IMAGES, REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def chexdist(*args: str, stdout=subprocess.PIPE, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexdist", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def real_root(real_data, tmp_path_factory) -> Path:
    """An NIH root: the full 112,120-row metadata table and symlinks to the 70 real X-rays."""
    root = tmp_path_factory.mktemp("real-nih")
    (root / "images").mkdir()
    for png in REAL_IMAGES.glob("*.png"):
        (root / "images" / png.name).symlink_to(png)
    (root / REAL_CSV.name).symlink_to(REAL_CSV)
    return root


@pytest.fixture(scope="module")
def packed(real_root, tmp_path_factory) -> dict:
    """--only-present packs: the default fractions (7 val images) and a 1-image val split."""
    base = tmp_path_factory.mktemp("real-shards")
    results = {}
    for name, extra in (("val7", []), ("val1", ["--fractions", "0.9", "0.02", "0.08"])):
        out = base / name
        result = chexdist("pack", "--nih-root", str(real_root), "--out", str(out), "--size", "64", "--workers", "1",
                          "--only-present", "--quiet", *extra)
        assert result.returncode == 0, result.stderr
        results[name] = (out, result)
    return results


def strict_json_files(*folders: Path) -> list[Path]:
    """Parse every .json/.jsonl file under the folders with a strict parser; return their paths."""
    files = [p for folder in folders for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    for path in files:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(str.strip, lines):
            loads_strict(line)
    return files


def test_strict_json_writers_turn_non_finite_floats_into_null(tmp_path):
    record = {"auc": float("nan"), "hi": float("inf"), "np": np.float32("nan"), "ok": np.float64(0.5), "l": [float("-inf"), 1]}
    assert loads_strict(dumps_json(record)) == {"auc": None, "hi": None, "np": None, "ok": 0.5, "l": [None, 1]}
    atomic_write_json(tmp_path / "a.json", record)
    append_jsonl(tmp_path / "a.jsonl", record)
    assert strict_json_files(tmp_path) and "NaN" not in (tmp_path / "a.jsonl").read_text()
    with pytest.raises(ValueError, match="NaN"):
        loads_strict('{"x": NaN}')


def test_pack_only_present_with_the_full_table(packed):
    out, result = packed["val7"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["splits"].values()) == 70 == len(list(REAL_IMAGES.glob("*.png")))
    assert manifest["missing"]["rows"] == 112_120 - 70 and manifest["missing"]["in_errors"] is False
    assert sum(manifest["missing"]["by_folder"].values()) == 112_050 and "images/" in manifest["missing"]["by_folder"]
    assert (out / "errors.jsonl").read_text() == "" and manifest["errors"] == 0  # a count, not 112,050 lines
    assert "112,050 of 112,120 rows" in result.stdout and "images/" in result.stdout
    assert "--only-present" not in result.stdout  # the hint is for runs without it
    val = manifest["splits"]["val"]
    no_positives = [label for label, k in val["positives"].items() if k == 0]
    assert no_positives and 0 < val["samples"] < 70
    warning = [line for line in result.stderr.splitlines() if "the val split" in line]
    assert len(warning) == 1 and f"cannot score {len(no_positives)} of 14" in warning[0], result.stderr
    assert strict_json_files(out)


@pytest.mark.slow
def test_a_run_that_cannot_be_scored_exits_non_zero_with_one_line(packed, tmp_path):
    shards, _ = packed["val1"]
    assert json.loads((shards / "manifest.json").read_text())["splits"]["val"]["samples"] == 1
    out = tmp_path / "run"
    result = chexdist("train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--no-progress",
                      "--set", "train.epochs=1", "--set", "data.eval_resize=150")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("chexdist: error:")]
    assert len(errors) == 1 and "no epoch could be scored" in errors[0] and "no best model" in errors[0]
    assert "Traceback" not in result.stderr
    assert sum("keeps only 18% of the image area" in line for line in result.stderr.splitlines()) == 1
    assert not (out / "best.safetensors").exists()
    (record,) = map(loads_strict, (out / "metrics.jsonl").read_text().splitlines())
    assert record["val_auc_mean"] is None and len(record["val_auc_undefined"]) == 14


@pytest.mark.slow
def test_log_file_progress_strict_json_and_resume_with_only_out(packed, tmp_path):
    shards, _ = packed["val7"]
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # a file, not a terminal: no bars, timed plain lines
        result = chexdist("train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out),
                          "--set", "train.epochs=2", "--set", "train.log_every_s=0.001", stdout=f)
    assert result.returncode == 0, result.stderr[-2000:]
    text = log.read_text()
    lines = text.splitlines()
    batches = -(-49 // 16)  # 49 train images, batch 16
    assert "\r" not in text and "\r" not in result.stderr
    assert all(len(line) < 300 for line in lines)
    progress = [line for line in lines if " img/s " in line]
    assert len(progress) >= 1 and len(progress) <= 2 * (batches - 1) and all("ETA" in line and " lr " in line for line in progress)
    epochs = [line for line in lines if line.startswith("epoch ") and "val_auc" in line]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert len(lines) <= len(progress) + 6

    records = [loads_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((shards / "manifest.json").read_text())
    absent = {label for label, k in manifest["splits"]["val"]["positives"].items() if k == 0}
    for record in records:
        assert {k for k, v in record["val_auc"].items() if v is None} == set(record["val_auc_undefined"]) >= absent
        assert all(record["val_auc_undefined"][label] == "no positives in val" for label in absent)
        assert all(record["val_f1"][label] is None for label in absent)
    best = loads_strict((out / "best.json").read_text())
    assert best["eval_resize"] == 73 and best["config"]["data"]["eval_resize"] == 73 and best["crop_pct"] == 0.875
    assert set(best["labels"]) == set(LABELS) and len(strict_json_files(out, shards)) >= 6

    refused = chexdist("train", "--out", str(out), "--resume", "--set", "optim.lr=0.5")
    assert refused.returncode == 2 and "changed settings" in refused.stderr and "optim.lr" in refused.stderr
    resumed = chexdist("train", "--out", str(out), "--resume", "--set", "train.epochs=3", "--set", "train.log_every_s=30")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(resumed.stdout.splitlines()) <= 5 and "\r" not in resumed.stdout + resumed.stderr
    launched = subprocess.run([sys.executable, str(REPO / "chexdist" / "train.py"), "--out", str(out), "--resume",
                               "--set", "train.epochs=4", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                              env=ENV, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert [r["epoch"] for r in map(loads_strict, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    missing = chexdist("train", "--out", str(tmp_path / "nothing"), "--resume")
    assert missing.returncode == 2 and "config.yaml: not found" in missing.stderr


def test_help_texts_config_show_and_python_m():
    top = chexdist("--help")
    description = " ".join(top.stdout.split("\n\n")[1].split())
    assert top.returncode == 0 and description.startswith("chexdist trains and evaluates multi-label")
    assert description.endswith("Start with `chexdist demo`.")  # whole sentences, not a cut docstring
    train = " ".join(chexdist("train", "--help").stdout.split())
    assert "Train a multi-label chest X-ray classifier" in train and "`chexdist config show --recipe R`" in train
    assert "--no-progress no progress bar" in train
    shown = chexdist("config", "show", "--recipe", "tiny", "--set", "data.image_size=96")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if not line.startswith("#")}
    assert list(rows) == config_keys()
    assert "109 (derived)" in rows["data.eval_resize"] and "floor(image_size / crop_pct)" in rows["data.eval_resize"]
    assert "bce | wbce | focal" in rows["loss.name"] and "> 0 and <= 1" in rows["data.crop_pct"]
    assert "test_resnet" in rows["model.name"] and ">= 1" in rows["train.epochs"]
    warned = chexdist("config", "show", "--recipe", "chexnet", "--set", "data.eval_resize=400")
    assert "# warning: evaluation keeps only 31%" in warned.stdout
    bad = chexdist("config", "show", "--set", "loss.name=mse")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "loss.name" in bad.stderr
