"""The training loop in real processes: 2-process CPU DDP through `accelerate launch`, exact resume
after SIGTERM, non-finite loss, refusals before training starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chexdist.training.launcher import free_port
from chexdist.errors import ChexdistError
from tests.conftest import REPO

TRAIN_PY = str(REPO / "chexdist" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=kw.pop("env", ENV), **kw)


def train_cmd(shards: Path, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_through_accelerate_launch(train_shards, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), TRAIN_PY, "--recipe", "tiny", "--shards", str(train_shards), "--out", str(out),
           "--no-progress", "--set", "train.epochs=4"]
    result = run(cmd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes (MULTI_CPU, cpu)" in result.stdout
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in records)
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert records[-1]["val_samples"] == manifest["splits"]["val"]["samples"]
    best = json.loads((out / "best.json").read_text())
    assert best["val_metrics"]["val_auc_mean"] == max(r["val_auc_mean"] for r in records) > 0.8
    assert set(best["thresholds"]) == set(best["labels"]) and best["arch"] == "test_resnet"
    assert (out / "best.safetensors").is_file() and (out / "config.yaml").is_file()
    assert len(list((out / "checkpoints").iterdir())) == 3  # keep_checkpoints

    from chexdist.runs import load_best

    model, info = load_best(out)
    assert info["epoch"] == best["epoch"]
    swapped = dict(best, labels=[best["labels"][1], best["labels"][0], *best["labels"][2:]])
    (out / "best.json").write_text(json.dumps(swapped))
    with pytest.raises(ChexdistError, match="label order differs"):
        load_best(out)


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run(train_shards, tmp_path):
    # a step checkpoint inside epoch 2 (step 30 = epoch 1, batch 6) marks the kill point: a SIGTERM sent
    # once it exists is taken inside that epoch, never at an epoch boundary (a race at a boundary's save)
    sets = ("train.epochs=3", "data.max_train_batches=24", "train.deterministic=true", "train.checkpoint_every=30")
    reference = tmp_path / "reference"
    done = run(train_cmd(train_shards, reference, *sets), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(train_cmd(train_shards, out, *sets), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step000000030-epoch0001-batch000006")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "rerun with --resume" in stderr
    assert len(metrics(out)) < 3
    mid = sorted((out / "checkpoints").iterdir())[-1]
    assert not mid.name.endswith("batch000000"), "the SIGTERM checkpoint is taken inside an epoch"

    resumed = run([*train_cmd(train_shards, out, *sets), "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(reference), metrics(out)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ("val_loss", "val_auc", "val_f1", "val_thresholds", "lr"):
            assert ra[key] == rb[key], key
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9)
    wa, wb = load_file(reference / "best.safetensors"), load_file(out / "best.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = lambda run_dir: load_file(sorted((run_dir / "checkpoints").iterdir())[-1] / "model.safetensors")  # noqa: E731
    la, lb = last(reference), last(out)
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_non_finite_loss_stops_with_the_step(train_shards, tmp_path):
    result = run(train_cmd(train_shards, tmp_path / "nan", "optim.name=sgd", "optim.lr=1e12", "train.epochs=1"), timeout=300)
    assert result.returncode == 2
    assert "loss became nan/inf at step" in result.stderr


def test_refusals_before_training(train_shards, tmp_path):
    out = tmp_path / "bad"
    result = run([sys.executable, "-m", "chexdist.cli", "train", "--nproc", "2", "--recipe", "tiny", "--shards", str(train_shards),
                  "--out", str(out), "--set", "optim.lrr=1e-3"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [l for l in result.stderr.strip().splitlines() if "optim.lrr" in l]
    assert "unknown config key 'optim.lrr'" in result.stderr and not out.exists()

    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    launched = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", str(free_port()), TRAIN_PY, "--recipe", "tiny", "--shards", str(train_shards), "--out", str(out),
                    "--set", "loss.name=hinge"], env=env, timeout=120)
    assert launched.returncode != 0 and "config key 'loss.name': 'hinge'" in launched.stderr and not out.exists()

    mismatch = tmp_path / "mismatch"
    shutil.copytree(train_shards, mismatch)
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["labels"][0], manifest["labels"][1] = manifest["labels"][1], manifest["labels"][0]
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    refused = run(train_cmd(mismatch, out), timeout=120)
    assert refused.returncode == 2 and "label order differs" in refused.stderr and not out.exists()


def test_existing_run_needs_resume_and_same_settings(train_shards, tmp_path):
    out = tmp_path / "run"
    first = run(train_cmd(train_shards, out, "train.epochs=1", "data.max_train_batches=2"), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run(train_cmd(train_shards, out, "train.epochs=1", "data.max_train_batches=2"), timeout=120)
    assert again.returncode == 2 and "already has checkpoints" in again.stderr
    changed = run([*train_cmd(train_shards, out, "train.epochs=2", "data.max_train_batches=2", "optim.lr=0.01"), "--resume"], timeout=120)
    assert changed.returncode == 2 and "optim.lr" in changed.stderr
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging epoch 2, before its checkpoint
        f.write(json.dumps({"epoch": 2, "val_auc_mean": -1.0}) + "\n")
    extended = run([*train_cmd(train_shards, out, "train.epochs=2", "data.max_train_batches=2"), "--resume"], timeout=300)
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    assert metrics(out)[1]["val_auc_mean"] > 0


def test_python_api_report_callback_accumulation_and_clipping(train_shards, tmp_path):
    """fit() as Ray Tune calls it: the report callback gets each epoch's record; with grad_accum=2 a
    5-batch epoch takes 3 optimizer steps (2 + 2 + a final partial group)."""
    script = f"""
import json
from chexdist.config import load_config
from chexdist.training.engine import fit
cfg = load_config("tiny", overrides=["data.shards={train_shards}", "train.epochs=2", "data.max_train_batches=5",
                                     "train.grad_accum=2", "train.grad_clip=1.0"])
records = []
result = fit(cfg, r"{tmp_path / 'api'}", report=records.append, progress=False)
print(json.dumps({{"records": records, "best": result.best_auc, "epochs": result.epochs}}))
"""
    done = run([sys.executable, "-c", script], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    records = payload["records"]
    assert [r["step"] for r in records] == [3, 6] and payload["epochs"] == 2
    assert records == metrics(tmp_path / "api")
    assert payload["best"] == max(r["val_auc_mean"] for r in records)
    for key in ("epoch", "val_loss", "val_auc_mean", "val_f1_mean", "val_auc", "val_f1"):
        assert key in records[0]
    assert set(records[0]["val_auc"]) == set(json.loads((tmp_path / "api" / "best.json").read_text())["labels"])
