"""Experiment trackers through Accelerate (`train.log_with`): TensorBoard, MLflow, W&B, Aim.

Nothing is contacted unless asked: TensorBoard writes event files under `<run>/chexdist/`; MLflow
uses `sqlite:///<run>/mlflow.db` and artifacts in `<run>/mlartifacts/` (unless MLFLOW_TRACKING_URI is
set: then the server's experiment decides) with telemetry off; W&B runs
offline unless WANDB_MODE says otherwise. Only numbers are logged as metrics (Accelerate's MLflow
tracker drops anything else). A resumed run continues the same tracker run: the MLflow / W&B run
ids are kept in `<run>/trackers.json`; TensorBoard purges the events after the checkpoint's step
(`purge_step`), and steps MLflow already holds (identical, since resume is exact) are not sent to it
again, so a run killed even after its last checkpoint shows no step twice. Each log is flushed.
At the end of a run, rank 0 sends the best epoch's ROC curves and Grad-CAM overlays through each
tracker's own image call (`trackerimages`); `accelerator.log` logs no images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from chexdist.config import Config, config_to_dict
from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_json

PROJECT = "chexdist"  # TensorBoard subfolder, MLflow experiment, W&B project
STATE_FILE = "trackers.json"
ARTIFACTS = "mlartifacts"  # MLflow artifacts of a run-local store
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim"}


def check_trackers(names: list[str]) -> None:
    """One line naming the extra to install for a tracker that is asked for but missing."""
    for name in names:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise ChexdistError(f"config key 'train.log_with': {name} is not installed; pip install 'chexdist[{name}]'")


def accelerator_kwargs(config: Config, out: Path | None) -> dict[str, Any]:
    """What `Accelerator(...)` needs for the run's trackers (nothing when train.log_with is empty)."""
    if not config.train.log_with or out is None:
        return {}
    check_trackers(config.train.log_with)
    return {"log_with": list(config.train.log_with), "project_dir": str(out)}


def hyperparameters(config: Config) -> dict[str, Any]:
    """The resolved config flattened to 'section.key' -> bool/int/float/str (what every tracker takes)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        if not isinstance(values, dict):
            flat[section] = values if isinstance(values, (bool, int, float, str)) else str(values)
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def epoch_metrics(record: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """The numbers of one epoch's record: val loss, mean AUROC/AP/F1, per-class AUROC (unscorable
    findings left out), train loss and lr."""
    values = {f"{prefix}/loss": record["val_loss"], f"{prefix}/auc_mean": record["val_auc_mean"],
              f"{prefix}/ap_mean": record["val_ap_mean"], f"{prefix}/f1_mean": record["val_f1_mean"]}
    values.update({f"{prefix}/auc/{label}": auc for label, auc in record["val_auc"].items() if auc is not None})
    if prefix == "val":
        values.update({"train/epoch_loss": record["train_loss"], "epoch": record["epoch"], "train/epoch_lr": record["lr"]})
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v == v}


class RunTrackers:
    """The run's trackers: started after the run folder is opened, fed per step (at most every
    train.log_every_s, or every train.log_every_steps) and per epoch, finished by `close`."""

    def __init__(self, accelerator, config: Config, out: Path):
        self.accelerator, self.config, self.out = accelerator, config, out
        self.names = list(config.train.log_with)
        self.last_time, self.last_step = time.perf_counter(), 0
        self.mlflow_through = 0  # the last step the resumed MLflow run already holds
        self.best_val: tuple | None = None  # (val probs, targets) of the best epoch, when this process ran it

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def start(self, step: int, global_batch: int) -> None:
        if not self.enabled:
            return
        check_trackers(self.names)
        self.global_batch, self.last_step = global_batch, step
        acc = self.accelerator
        if [str(t) for t in acc.log_with] != self.names:  # an Accelerator made without them (Ray Train trials)
            acc.log_with = list(self.names)
            acc.project_configuration.set_directories(str(self.out))
        if not acc.is_main_process:
            return
        saved = json.loads((self.out / STATE_FILE).read_text()) if (self.out / STATE_FILE).is_file() else {}
        acc.init_trackers(PROJECT, config=None if saved else hyperparameters(self.config),
                          init_kwargs=self._init_kwargs(saved, step))
        ids = {}
        if "mlflow" in self.names:
            ids["mlflow_run_id"] = acc.get_tracker("mlflow", unwrap=True).info.run_id
            self.mlflow_through = _last_mlflow_step(ids["mlflow_run_id"]) if saved.get("mlflow_run_id") else 0
        if "wandb" in self.names:
            ids["wandb_run_id"] = acc.get_tracker("wandb", unwrap=True).id
        atomic_write_json(self.out / STATE_FILE, {**saved, **ids, "started": True})

    def _init_kwargs(self, saved: dict, step: int) -> dict[str, dict]:
        kwargs: dict[str, dict] = {}
        if "tensorboard" in self.names and step:
            kwargs["tensorboard"] = {"purge_step": step + 1}
        if "mlflow" in self.names:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(uri or f"sqlite:///{self.out.resolve()}/mlflow.db")
            kwargs["mlflow"] = {"run_id": saved.get("mlflow_run_id"), "run_name": self.out.name}
            if not uri:  # the run's own store keeps its artifacts beside it (MLflow's default is ./mlruns in the cwd)
                kwargs["mlflow"]["logging_dir"] = str(self.out.resolve() / ARTIFACTS)
        if "wandb" in self.names:
            os.environ.setdefault("WANDB_MODE", "offline")
            kwargs["wandb"] = {"dir": str(self.out), "name": self.out.name, "id": saved.get("wandb_run_id"), "resume": "allow"}
        return kwargs

    def log_step(self, step: int, loss, lr: float) -> None:
        """After optimizer step `step` (rank 0's loss of that step; a time-based choice must not
        start a collective that other ranks would not join)."""
        if not self.enabled or not self.accelerator.is_main_process:
            return
        every, now = self.config.train.log_every_steps, time.perf_counter()
        due = step % every == 0 if every else (now - self.last_time >= self.config.train.log_every_s or step == 1)
        if not due:
            return
        images_s = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
        self._log({"train/loss": float(loss), "train/lr": float(lr), "train/images_per_s": images_s}, step)
        self.last_time, self.last_step = now, step

    def _log(self, values: dict[str, float], step: int) -> None:
        """`tracker.log` of each of Accelerate's trackers (as `accelerator.log` does), skipping steps
        the resumed MLflow run holds, then flushed so a killed run has written all it logged."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow" and step <= self.mlflow_through:
                continue
            tracker.log(values, step=step)
            if tracker.name == "tensorboard":
                tracker.writer.flush()

    def log_epoch(self, record: dict[str, Any], val: dict[str, Any], ema_val: dict[str, Any] | None, best: bool) -> None:
        """After an epoch's `_close_epoch`: its numbers; when `best`, keep the exported weights' val
        predictions (`val` / `ema_val`: the validations' `probs` and `targets`) for `log_best_images`."""
        if not self.enabled or not self.accelerator.is_main_process:
            return
        if best:
            chosen = ema_val if record.get("better_weights") == "ema" else val
            self.best_val = (chosen["probs"], chosen["targets"])
        values = epoch_metrics(record)
        if record.get("val_ema") is not None:
            values.update(epoch_metrics(record["val_ema"], "val_ema"))
        if self.accelerator.device.type == "cuda":
            import torch

            values["gpu/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._log(values, record["step"])

    def log_best_images(self, config: Config, manifest: dict, step: int) -> None:
        """Rank 0, at the end of a run: the best epoch's ROC curves and Grad-CAM overlays (of
        best.safetensors) to every tracker with an image call, at the run's last step."""
        if not self.enabled or not self.accelerator.is_main_process:
            return
        from chexdist.training import trackerimages

        takers = [t for t in self.accelerator.trackers if t.name in trackerimages.IMAGE_TRACKERS]
        if not takers:
            return
        images = trackerimages.best_images(self.out, config, manifest, self.accelerator.device, self.best_val)
        try:
            for tracker in takers:
                trackerimages.send_images(tracker, images, step)
        finally:
            images.close()

    def close(self, owns_accelerator: bool) -> None:
        """`end_training` when fit made the Accelerator (trackers finished, process group released);
        an Accelerator passed in (Ray Train) keeps its process group, so only the trackers finish."""
        if owns_accelerator:
            self.accelerator.end_training()
        else:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def _last_mlflow_step(run_id: str) -> int:
    """The last step a run holds of the metrics logged every step and every epoch."""
    import mlflow

    client = mlflow.MlflowClient()
    return max((m.step for key in ("train/loss", "val/auc_mean") for m in client.get_metric_history(run_id, key)), default=0)
