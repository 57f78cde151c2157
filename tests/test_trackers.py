"""Trackers, per-step schedule, EMA and the best-epoch images across a kill: one unbroken run (in
this process, TensorBoard only) and one run killed with SIGKILL after its step-6 checkpoint, then
resumed with --resume from its step-3 one (so steps 4..6+ were logged before the kill and are logged
again after it: none may appear twice). Read back with TensorBoard's EventAccumulator and
mlflow.MlflowClient; compared with the unbroken run."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.test_train import ENV, metrics, run, train_cmd

SETS = ("train.epochs=2", "data.max_train_batches=8", "train.deterministic=true", "train.checkpoint_every=3",
        "train.log_with=tensorboard,mlflow", "train.log_every_steps=1", "train.ema_decay=0.8",
        "sched.name=cosine", "sched.per_step=true", "sched.warmup_steps=4")
STEPS = 16


def fit_here(shards: Path, out: Path, *sets: str, resume: str | None = None) -> None:
    """`chexdist train --recipe tiny` in this process, on one thread as the subprocesses (ENV), so both
    compute alike."""
    from chexdist.config import load_config
    from chexdist.training.engine import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(load_config("tiny", overrides=[f"data.shards={shards}", *sets]), out, resume=resume, progress=False)
    finally:
        torch.set_num_threads(threads)


def kill_after_checkpoint(proc: subprocess.Popen, checkpoints: Path, step: int) -> None:
    deadline = time.time() + 300
    while not list(checkpoints.glob(f"step{step:09d}-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module")
def pair(train_shards, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trackers")
    reference, killed = root / "reference", root / "killed"
    proc = subprocess.Popen(train_cmd(train_shards, killed, *SETS), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killer = threading.Thread(target=kill_after_checkpoint, args=(proc, killed / "checkpoints", 6))
    killer.start()  # the unbroken run trains here meanwhile, without MLflow (its own test reads the killed run's)
    fit_here(train_shards, reference, *[s for s in SETS if not s.startswith("train.log_with")], "train.log_with=tensorboard")
    killer.join()
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


def tb_images(out: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "chexdist"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def best_auc(out: Path) -> dict[str, float]:
    return {k: v for k, v in json.loads((out / "best.json").read_text())["val_metrics"]["val_auc"].items() if v is not None}


@pytest.mark.slow
def test_best_epoch_roc_and_gradcam_images_reach_tensorboard_and_mlflow(pair):
    """Once, at the last step: the ROC grid (640 x 384, curves drawn) and one row of Grad-CAM overlays
    of the finding with the best val AUROC in best.json; MLflow holds both as figures."""
    import mlflow

    from chexdist.training.trackerimages import CAM_IMAGES, CAM_TAG, ROC_DPI, ROC_FIGSIZE, ROC_TAG

    for out in pair:
        aucs = best_auc(out)
        top = max(aucs, key=aucs.get)
        images = tb_images(out)
        assert set(images) == {ROC_TAG, f"{CAM_TAG}/{top}"}, out
        (roc,), (cam,) = images[ROC_TAG], images[f"{CAM_TAG}/{top}"]
        assert roc.step == cam.step == STEPS
        assert (roc.width, roc.height) == (ROC_FIGSIZE[0] * ROC_DPI, ROC_FIGSIZE[1] * ROC_DPI) == (640, 384)
        assert (cam.width, cam.height) == (CAM_IMAGES * 64, 64)  # the tiny recipe's 64 px crops, side by side
        pixels = png_array(roc.encoded_image_string).astype(int)
        blue = (pixels[..., 2] - pixels[..., 0] > 80).mean()  # the curves (tab:blue)
        assert blue > 0.003 and (pixels.min(axis=2) < 200).mean() > 0.02, blue
        overlays = png_array(cam.encoded_image_string)
        assert overlays.std() > 10
    run_id = json.loads((pair[1] / "trackers.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pair[1] / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(run_id, "best")} == {f"{ROC_TAG}.png", f"{CAM_TAG}.png"}
    assert sorted(p.relative_to(pair[1]).as_posix() for p in (pair[1] / "mlartifacts").rglob("*.png")) == [
        f"mlartifacts/{run_id}/artifacts/{CAM_TAG}.png", f"mlartifacts/{run_id}/artifacts/{ROC_TAG}.png"]
    assert not (REPO / "mlruns").exists()  # nothing written in the working directory (MLflow's default)


@pytest.mark.slow
def test_roc_points_are_sklearns_on_the_best_epochs_val_predictions(pair):
    """best.safetensors predicted again on val (the path of a run resumed after its best epoch): the
    curve points equal scikit-learn's roc_curve, their areas equal best.json's val AUROC (so these are
    the best epoch's predictions), the figure plots exactly them, and it is the image TensorBoard holds."""
    from sklearn.metrics import roc_curve

    from chexdist.config import config_from_dict
    from chexdist.data.mixture import load_sources
    from chexdist.labels import LABELS
    from chexdist.runs import load_best
    from chexdist.training import trackerimages as ti

    reference = pair[0]
    model, info = load_best(reference)
    config = config_from_dict(info["config"])
    loader = ti.val_loader(config, load_sources(config.data.shards), info["normalization"], 32)
    probs, targets = ti.val_predictions(model, loader, torch.device("cpu"))
    assert probs.shape == (70, 14)
    curves = ti.roc_curves(probs, targets)
    aucs = best_auc(reference)
    assert set(curves) == set(aucs) and len(aucs) >= 10
    fig = ti.roc_figure(curves, ti.roc_title(info))
    for j, label in enumerate(LABELS):
        if label not in curves:
            continue
        fpr, tpr, _ = roc_curve(targets[:, j], probs[:, j], drop_intermediate=False)
        np.testing.assert_allclose(curves[label]["fpr"], fpr, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curves[label]["tpr"], tpr, rtol=0, atol=1e-12)
        assert curves[label]["auc"] == pytest.approx(aucs[label], rel=1e-6)
        line = fig.axes[j].lines[1].get_xydata()
        np.testing.assert_array_equal(line, np.column_stack([fpr, tpr]))
    logged = png_array(tb_images(reference)[ti.ROC_TAG][0].encoded_image_string)
    assert np.array_equal(ti.figure_array(fig), logged)
    ti.BestImages(info["epoch"], logged, fig).close()


@pytest.mark.slow
def test_without_grad_cam_only_the_roc_is_logged_with_one_line(pair, monkeypatch, caplog):
    import logging

    from chexdist.config import config_from_dict
    from chexdist.data.mixture import load_sources
    from chexdist.training import trackerimages as ti

    monkeypatch.setattr(ti, "CAM_MODULE", "chexdist_no_such_module")
    config = config_from_dict(json.loads((pair[0] / "best.json").read_text())["config"])
    with caplog.at_level(logging.WARNING, logger="chexdist"):
        images = ti.best_images(pair[0], config, load_sources(config.data.shards), torch.device("cpu"))
    images.close()
    assert images.cam == [] and images.cam_figure is None and images.finding is None and images.roc.shape == (384, 640, 3)
    (line,) = [r.getMessage() for r in caplog.records if "grad-cam" in r.getMessage()]
    assert line.endswith("no Grad-CAM overlays; pip install 'chexdist[cam]'")
