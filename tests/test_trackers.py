"""Trackers, per-step schedule and EMA across a kill: one unbroken run and one run killed with
SIGKILL after its step-6 checkpoint, then resumed from its step-3 one (so steps 4..6+ were logged
before the kill and are logged again after it: none may appear twice). Read back
with TensorBoard's EventAccumulator and mlflow.MlflowClient; compared with the unbroken run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_train import ENV, metrics, run, train_cmd

SETS = ("train.epochs=2", "data.max_train_batches=8", "train.deterministic=true", "train.checkpoint_every=3",
        "train.log_with=tensorboard,mlflow", "train.log_every_steps=1", "train.ema_decay=0.8",
        "sched.name=cosine", "sched.per_step=true", "sched.warmup_steps=4")
STEPS = 16


@pytest.fixture(scope="module")
def pair(train_shards, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trackers")
    reference, killed = root / "reference", root / "killed"
    done = run(train_cmd(train_shards, reference, *SETS), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(train_cmd(train_shards, killed, *SETS), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step000000006-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert max(s for s, _ in scalars(killed)["train/loss"]) >= 6  # logged past the checkpoint resumed below
    (older,) = (killed / "checkpoints").glob("step000000003-epoch0000-batch000003")
    resumed = run([*train_cmd(train_shards, killed, *SETS), "--resume", str(older)], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return reference, killed


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "chexdist"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_events_have_every_step_once_and_every_class_auc(pair):
    reference, killed = pair
    tb = scalars(killed)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in tb["train/images_per_s"]] == list(range(1, STEPS + 1))
    records = metrics(killed)
    for tag in ("val/auc_mean", "val/loss", "val/f1_mean", "val_ema/auc_mean"):
        assert [s for s, _ in tb[tag]] == [r["step"] for r in records], tag
    for record in records:
        for label, auc in record["val_auc"].items():
            if auc is not None:
                assert dict(tb[f"val/auc/{label}"])[record["step"]] == pytest.approx(auc, rel=1e-6)
        assert dict(tb["val/auc_mean"])[record["step"]] == pytest.approx(record["val_auc_mean"], rel=1e-6)
    ref = scalars(reference)
    assert [s for s, _ in ref["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in ref["train/loss"]], rel=1e-6)


@pytest.mark.slow
def test_per_step_lr_after_mid_epoch_resume_equals_unbroken_run(pair):
    reference, killed = pair
    lr_ref, lr_resumed = scalars(reference)["train/lr"], scalars(killed)["train/lr"]
    assert [s for s, _ in lr_resumed] == list(range(1, STEPS + 1))
    assert lr_resumed == lr_ref
    from chexdist.config import load_config
    from chexdist.training.schedules import StepFactor

    base = load_config("tiny").optim.lr
    factor = StepFactor("cosine", 4, 0.0, STEPS)
    assert [v for _, v in lr_ref] == pytest.approx([base * factor(k - 1) for k in range(1, STEPS + 1)], rel=1e-6)
    assert lr_ref[0][1] == pytest.approx(base / 5) and lr_ref[4][1] == pytest.approx(base)


@pytest.mark.slow
def test_mlflow_run_read_back_with_mlflow_client(pair):
    import mlflow

    reference, killed = pair
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "chexdist"]
    (one,) = client.search_runs([experiment.experiment_id])
    assert one.info.run_id == json.loads((killed / "trackers.json").read_text())["mlflow_run_id"]
    losses = client.get_metric_history(one.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
    tb = dict(scalars(reference)["train/loss"])
    assert all(m.value == pytest.approx(tb[m.step], rel=1e-6) for m in losses)
    auc = sorted((m.step, m.value) for m in client.get_metric_history(one.info.run_id, "val/auc_mean"))
    assert auc == [(r["step"], pytest.approx(r["val_auc_mean"])) for r in metrics(reference)]
    assert one.data.params["optim.lr"] == "0.001" and one.data.params["train.ema_decay"] == "0.8"


@pytest.mark.slow
def test_ema_resumed_mid_epoch_equals_unbroken_and_best_json_says_which(pair):
    reference, killed = pair
    last = lambda out: sorted((out / "checkpoints").iterdir())[-1] / "trainer_state.pt"  # noqa: E731
    ea, eb = (torch.load(last(out), weights_only=True)["ema"] for out in pair)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    best = json.loads((killed / "best.json").read_text())
    record = next(r for r in metrics(killed) if r["epoch"] == best["epoch"])
    assert best["weights"] == record["better_weights"]
    chosen = record["val_ema"] if best["weights"] == "ema" else record
    assert best["val_metrics"]["val_auc_mean"] == chosen["val_auc_mean"] == max(
        max(r["val_auc_mean"], r["val_ema"]["val_auc_mean"]) for r in metrics(killed))


def test_a_missing_tracker_is_refused_in_one_line_before_training(train_shards, tmp_path, monkeypatch):
    from chexdist.config import load_config
    from chexdist.errors import ChexdistError
    from chexdist.training import trackers
    from chexdist.training.preflight import preflight

    monkeypatch.setitem(trackers.MODULES, "wandb", "chexdist_no_such_tracker_module")
    cfg = load_config("tiny", overrides=[f"data.shards={train_shards}", "train.log_with=tensorboard,wandb"])
    assert cfg.train.log_with == ["tensorboard", "wandb"]
    with pytest.raises(ChexdistError, match=r"^config key 'train.log_with': wandb is not installed; pip install 'chexdist\[wandb\]'$"):
        preflight(cfg, tmp_path / "run", None)
    assert not (tmp_path / "run").exists()
    assert trackers.hyperparameters(cfg)["optim.betas"] == "[0.9, 0.999]" and trackers.hyperparameters(cfg)["optim.lr"] == 0.001
