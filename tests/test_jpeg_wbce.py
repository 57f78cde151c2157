"""`--format jpg` shards end to end and `loss.name=wbce`: one tiny run trained (a real `python -m
chexdist.train` process) on JPEG shards with the weighted BCE, then its recorded val loss recomputed by
hand with pos_weight = negatives/positives of the manifest's train split, and `chexdist predict` on the
source files of the JPEG samples giving what `chexdist evaluate` gives on those shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from chexdist.labels import LABELS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def jpeg_run(synth_root, tmp_path_factory) -> tuple[Path, Path]:
    from chexdist.data.pack import PackSettings, pack_dataset

    root = tmp_path_factory.mktemp("jpeg")
    shards, out = root / "shards", root / "run"
    pack_dataset(synth_root, shards, PackSettings(split="random", size=64, shard_size=40, format="jpg"), workers=1,
                 progress=False)
    cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--no-progress",
           "--set", "train.epochs=1", "--set", "loss.name=wbce"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return shards, out


def evaluated(run: Path, shards: Path, split: str, out: Path) -> dict:
    from chexdist.evaluation.evaluate import evaluate_run, read_predictions

    evaluate_run(run, split=split, shards=str(shards), n_boot=0, out=out, progress=False, plots=False)
    return read_predictions(out / "predictions.csv")


@pytest.mark.slow
def test_jpeg_shards_hold_jpegs(jpeg_run):
    shards, _ = jpeg_run
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["image"]["format"] == "jpg"
    with tarfile.open(next(shards.glob("train-*.tar"))) as tar:
        names = tar.getnames()
        assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json"}
        assert tar.extractfile(next(n for n in names if n.endswith(".jpg"))).read(3) == b"\xff\xd8\xff"


@pytest.mark.slow
def test_wbce_val_loss_uses_the_manifest_pos_weight(jpeg_run, tmp_path):
    """val_loss of the one epoch (whose weights are best.safetensors) = mean over samples and findings of
    -(w y log p + (1 - y) log(1 - p)), w = negatives/positives of the train split (1 where either is 0)."""
    shards, run = jpeg_run
    manifest = json.loads((shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    positives = np.array([train["positives"][label] for label in LABELS], dtype=np.float64)
    negatives = train["samples"] - positives
    w = np.where((positives > 0) & (negatives > 0), negatives / np.maximum(positives, 1), 1.0)
    assert w.max() > 2, "the weights must differ from 1 for this check to tell wbce from bce"
    table = evaluated(run, shards, "val", tmp_path / "val")
    p, y = np.clip(table["probs"], 1e-12, 1 - 1e-12), table["targets"]
    wbce = float(np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p))))
    bce = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["val_loss"] == pytest.approx(wbce, rel=1e-4)
    assert abs(record["val_loss"] - bce) > 100 * abs(record["val_loss"] - wbce)


@pytest.mark.slow
def test_predict_on_the_source_files_matches_evaluate_on_the_jpeg_shards(synth_root, jpeg_run, tmp_path):
    """predict prepares a file as the run's shards hold it (resize, then a JPEG round trip at the pack's
    quality), so the source PNGs of the test split score as their JPEG samples do."""
    from chexdist.evaluation.predict import predict_files

    shards, run = jpeg_run
    table = evaluated(run, shards, "test", tmp_path / "test")
    sources = {p.stem: p for p in synth_root.glob("images_*/images/*.png")}
    result = predict_files(run, [sources[key] for key in table["keys"]], progress=False)
    assert not result.failures and len(result.records) == len(table["keys"]) > 10
    ours = {Path(r["image"]).stem: np.array([r["probabilities"][k] for k in LABELS]) for r in result.records}
    packed = dict(zip(table["keys"], table["probs"]))
    assert ours.keys() == packed.keys()
    assert max(float(np.abs(ours[k] - packed[k]).max()) for k in ours) < 1e-5
    assert np.std(list(ours.values()), axis=0).max() > 1e-3, "a constant model would match trivially"
