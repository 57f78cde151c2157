"""THE training loop. `fit(config, out)` is used by train.py, Ray Tune trials and the demo; no other
copy exists. Accelerate handles devices, DDP and autocast; we build the loaders ourselves (each rank
reads its own part of the shards, equal batch counts from the manifest), so nothing is re-sharded.

A run directory holds: config.yaml, metrics.jsonl (one line per epoch), checkpoints/ (Accelerate
`save_state` folders, last K kept, renamed into place only when complete), best.safetensors +
best.json (the best epoch by val mean AUROC, with val-tuned thresholds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexdist import __version__
from chexdist.config import Config, config_from_dict, config_to_dict, load_yaml, save_config
from chexdist.data import build_eval_loader, build_train_loader, load_manifest
from chexdist.errors import ChexdistError
from chexdist.io import append_jsonl, atomic_write_json, atomic_write_text
from chexdist.labels import LABELS, check_labels
from chexdist.losses import build_loss, pos_weight_from_counts
from chexdist.metrics import per_class_metrics, tune_thresholds
from chexdist.models import create_model, read_state_dict, save_weights
from chexdist.optim import build_optimizer, build_scheduler, step_scheduler
from chexdist.transforms import NORMALIZATION, build_transform

log = logging.getLogger("chexdist")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: the run saved a checkpoint on SIGTERM/SIGUSR1; requeue and --resume
CHECK_EVERY = 10  # optimizer steps between the cross-rank checks for preemption and non-finite loss
RESUMABLE_KEYS = {"train.epochs", "data.num_workers", "data.shards", "eval.bootstrap"}

Report = Callable[[dict[str, Any]], None]


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was saved. Exit with EXIT_REQUEUE and resume later."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: saved {checkpoint}; rerun with --resume to continue")
        self.checkpoint = checkpoint


class NonFiniteLoss(ChexdistError):
    pass


@dataclass
class TrainState:
    """Loop position and early-stopping memory, checkpointed with the model (torchtitan style)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches of the current epoch already consumed (mid-epoch checkpoints)
    loss_sum: float = 0.0
    loss_batches: int = 0
    epoch_seconds: float = 0.0
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FitResult:
    out: Path
    best_auc: float
    best_epoch: int
    epochs: int
    stopped_early: bool
    world_size: int
    is_main_process: bool
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Predictions:
    """Gathered, de-padded predictions of one split, ordered by sample index."""

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    patient_id: torch.Tensor
    skipped: int

    @property
    def probs(self) -> np.ndarray:
        return torch.sigmoid(self.logits).numpy()


class StopFlag:
    """Records SIGTERM/SIGUSR1 (SLURM preemption) so the loop can checkpoint at a safe point."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True
        log.warning("received %s: will checkpoint and exit at the next safe point", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_name(state: TrainState) -> str:
    return f"step{state.step:09d}-epoch{state.epoch:04d}-batch{state.batch:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))


class Checkpointer:
    """Accelerate `save_state` (model, optimizer, scaler, RNG per rank) plus our loop state and
    scheduler in `trainer_state.pt`, all loadable with weights_only=True. A checkpoint is written
    under a temp name and renamed into place when complete; the last `keep` are kept."""

    STATE_FILE = "trainer_state.pt"

    def __init__(self, accelerator, out: Path, state: TrainState, scheduler, keep: int):
        self.accelerator, self.out, self.state, self.scheduler, self.keep = accelerator, out, state, scheduler, keep

    def save(self) -> Path:
        acc = self.accelerator
        final = self.out / "checkpoints" / checkpoint_name(self.state)
        temp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process and temp.exists():
            shutil.rmtree(temp)
        acc.wait_for_everyone()
        acc.save_state(str(temp), safe_serialization=True)
        if acc.is_main_process:
            torch.save({"train_state": self.state.state_dict(), "scheduler": self.scheduler.state_dict()}, temp / self.STATE_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
            for old in list_checkpoints(self.out)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        state_file = path / self.STATE_FILE
        if not state_file.is_file():
            raise ChexdistError(f"{path}: not a complete chexdist checkpoint (no {self.STATE_FILE})")
        self.accelerator.load_state(str(path))
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        self.state.load_state_dict(saved["train_state"])
        self.scheduler.load_state_dict(saved["scheduler"])


def _resolve_resume(out: Path, resume: bool | str | None) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ChexdistError(f"{out}: --resume found no checkpoint under {out / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ChexdistError(f"--resume {path}: not a checkpoint folder")
    return path


def _check_resume_config(out: Path, config: Config) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(config_to_dict(config_from_dict(load_yaml(saved_path, "run config"))))
    now = _flatten(config_to_dict(config))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        first = changed[0]
        raise ChexdistError(
            f"{saved_path}: --resume with changed settings ({', '.join(changed[:5])}; e.g. {first} was "
            f"{saved.get(first)!r}, now {now.get(first)!r}); resume with the run's settings or use a new --out"
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------- best export


def export_best(model: torch.nn.Module, out: Path, info: dict[str, Any]) -> None:
    save_weights(model, out / "best.safetensors", labels=info["labels"], metadata={"recipe": info["recipe"]})
    atomic_write_json(out / "best.json", info)


def load_best(run_or_file: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported best model and its best.json; refuses a label order other than chexdist's."""
    path = Path(run_or_file)
    weights = path / "best.safetensors" if path.is_dir() else path
    info_path = weights.with_suffix(".json")
    if not weights.is_file() or not info_path.is_file():
        raise ChexdistError(f"{path}: no best.safetensors + best.json; train a run first (chexdist train)")
    info = json.loads(info_path.read_text())
    check_labels(info["labels"], source=str(info_path))
    state, meta = read_state_dict(weights)
    if "labels" in meta:
        check_labels(json.loads(meta["labels"]), source=str(weights))
    cfg = config_from_dict(info["config"])
    model = create_model(info["arch"], num_classes=len(info["labels"]), drop_rate=cfg.model.drop_rate, head=cfg.model.head)
    model.load_state_dict(state)
    return model.eval(), info


# ----------------------------------------------------------------------------------- the loop


def _make_accelerator(config: Config):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=config.train.precision if config.train.precision != "no" else None)


def predict_split(model, accelerator, shards: str, split: str, config: Config, manifest: dict) -> Predictions:
    """Run the model over one split on every rank and gather: each readable sample exactly once."""
    transform = build_transform(
        config.aug.preset, image_size=config.data.image_size, eval_resize=config.data.eval_resize, train=False
    )
    loader, _ = build_eval_loader(
        shards,
        split,
        config.data.eval_batch_size or 2 * config.data.batch_size,
        transform,
        config.data.num_workers,
        accelerator.num_processes,
        accelerator.process_index,
        manifest=manifest,
        pin_memory=accelerator.device.type == "cuda",
        normalize_in_loader=False,
    )
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "targets": [], "valid": [], "index": [], "patient_id": []}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            images = loader.normalize(batch.images.to(accelerator.device, non_blocking=True))
            with accelerator.autocast():
                logits = model(images)
            parts["logits"].append(logits.float())
            parts["targets"].append(batch.labels.to(accelerator.device))
            parts["valid"].append(batch.valid.to(accelerator.device))
            parts["index"].append(batch.index.to(accelerator.device))
            parts["patient_id"].append(batch.patient_id.to(accelerator.device))
    local = {k: torch.cat(v) for k, v in parts.items()}
    gathered = {k: accelerator.gather(v).cpu() for k, v in local.items()}
    skipped = int(accelerator.reduce(torch.tensor(loader.skipped, device=accelerator.device), "sum").item())
    keep = gathered["valid"].bool()
    order = torch.argsort(gathered["index"][keep])
    return Predictions(
        logits=gathered["logits"][keep][order],
        targets=gathered["targets"][keep][order].float(),
        index=gathered["index"][keep][order],
        patient_id=gathered["patient_id"][keep][order],
        skipped=skipped,
    )


def _validate(model, accelerator, criterion, config: Config, manifest: dict) -> dict[str, Any]:
    preds = predict_split(model, accelerator, config.data.shards, "val", config, manifest)
    if len(preds.targets) == 0:
        raise ChexdistError(f"{config.data.shards}: the val split has no readable samples; repack with a val split")
    val_loss = float(criterion(preds.logits, preds.targets))
    probs, targets = preds.probs, preds.targets.numpy()
    thresholds = tune_thresholds(probs, targets, metric=config.eval.threshold_metric)
    metrics = per_class_metrics(probs, targets, thresholds=thresholds)
    return {"val_loss": val_loss, "metrics": metrics, "skipped": preds.skipped}


def _epoch_record(state: TrainState, lr: float, val: dict, world_size: int, precision: str) -> dict[str, Any]:
    m = val["metrics"]
    return {
        "epoch": state.epoch,
        "step": state.step,
        "lr": lr,
        "train_loss": state.loss_sum / max(1, state.loss_batches),
        "val_loss": val["val_loss"],
        "val_auc_mean": m["auc_mean"],
        "val_ap_mean": m["ap_mean"],
        "val_f1_mean": m["f1_mean"],
        "val_auc": m["auc"],
        "val_ap": m["ap"],
        "val_f1": m["f1"],
        "val_thresholds": m["thresholds"],
        "val_samples": m["n"],
        "val_skipped": val["skipped"],
        "seconds": state.epoch_seconds,
        "world_size": world_size,
        "precision": precision,
    }


@contextlib.contextmanager
def _process_state_restored():
    """fit sets process-wide state (deterministic algorithms, cuDNN flags, global RNGs, thread count);
    Ray Tune runs trial after trial in one worker process, so fit puts it all back on exit."""
    import random

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads(),
             random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.set_num_threads(saved[4])
        random.setstate(saved[5])
        np.random.set_state(saved[6])
        torch.set_rng_state(saved[7])
        if saved[8] is not None:
            torch.cuda.set_rng_state_all(saved[8])


@_process_state_restored()
def fit(
    config: Config,
    out: str | os.PathLike,
    *,
    resume: bool | str | None = None,
    report: Report | None = None,
    accelerator=None,
    progress: bool = True,
) -> FitResult:
    """Train `config` into run folder `out`. `report(record)` is called after every epoch on every rank
    (Ray Tune passes one). Raises Preempted after saving on SIGTERM/SIGUSR1, NonFiniteLoss on nan/inf."""
    out = Path(out)
    if not config.data.shards:
        raise ChexdistError("config key 'data.shards' is empty; pass --shards DIR or --set data.shards=DIR")
    manifest = load_manifest(config.data.shards)
    if manifest["splits"]["train"]["samples"] == 0:
        raise ChexdistError(f"{config.data.shards}: the train split is empty")
    resume_from = _resolve_resume(out, resume)
    if resume_from is None and list_checkpoints(out):
        raise ChexdistError(f"{out}: already has checkpoints; pass --resume to continue it or choose a new --out")
    if resume_from is not None:
        _check_resume_config(out, config)

    accelerator = accelerator or _make_accelerator(config)
    from accelerate.utils import set_seed

    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    world, rank = accelerator.num_processes, accelerator.process_index
    precision = str(accelerator.mixed_precision)

    set_seed(config.train.seed)
    model = create_model(
        config.model.name, pretrained=config.model.pretrained, drop_rate=config.model.drop_rate, head=config.model.head
    )
    train_info = manifest["splits"]["train"]
    pos_weight = pos_weight_from_counts(train_info["positives"], train_info["samples"]) if config.loss.name == "wbce" else None
    criterion = build_loss(config.loss.name, gamma=config.loss.gamma, alpha=config.loss.alpha, pos_weight=pos_weight)
    optimizer = build_optimizer(config.optim, model.parameters())
    scheduler = build_scheduler(config.sched, optimizer, config.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    checkpointer = Checkpointer(accelerator, out, state, scheduler, config.train.keep_checkpoints)
    set_seed(config.train.seed + rank)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    if resume_from is not None:
        checkpointer.load(resume_from)
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.step}, batch {state.batch})")
    accelerator.print(
        f"chexdist {__version__}: {config.model.name} on {world} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device.type}, precision {precision}, train {train_info['samples']} images"
    )

    transform = build_transform(
        config.aug.preset,
        image_size=config.data.image_size,
        eval_resize=config.data.eval_resize,
        train=True,
        brightness=config.aug.brightness,
        contrast=config.aug.contrast,
        scale_min=config.aug.scale_min,
        degrees=config.aug.degrees,
        translate=config.aug.translate,
    )
    history = _resumed_history(out, state.epoch, accelerator.is_main_process) if resume_from is not None else []
    stopped_early = False
    with StopFlag() as stop:
        while state.epoch < config.train.epochs:
            loader, num_batches = build_train_loader(
                config.data.shards,
                config.data.batch_size,
                transform,
                config.data.num_workers,
                world,
                rank,
                seed=config.train.seed,
                epoch=state.epoch,
                shuffle_buffer=config.data.shuffle_buffer,
                max_batches=config.data.max_train_batches,
                manifest=manifest,
                pin_memory=accelerator.device.type == "cuda",
                normalize_in_loader=False,
            )
            train_epoch(model, optimizer, criterion, accelerator, config, loader, num_batches, state, stop, checkpointer, progress)
            val = _validate(model, accelerator, criterion, config, manifest)
            step_scheduler(scheduler, val["val_loss"])
            state.epoch += 1
            lr = optimizer.param_groups[0]["lr"]
            record = _epoch_record(state, lr, val, world, precision)
            history.append(record)
            improved = record["val_auc_mean"] > state.best_auc
            if improved:
                state.best_auc, state.best_epoch, state.bad_epochs = record["val_auc_mean"], state.epoch, 0
            else:
                state.bad_epochs += 1
            state.batch, state.loss_sum, state.loss_batches, state.epoch_seconds = 0, 0.0, 0, 0.0
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", record)
                accelerator.print(_format_epoch(record, config.train.epochs))
                if improved:
                    export_best(accelerator.unwrap_model(model), out, _best_info(config, record, manifest))
            checkpointer.save()
            if report is not None:
                report(record)
            patience = config.train.early_stop_patience
            if patience and state.bad_epochs >= patience:
                stopped_early = True
                accelerator.print(f"early stop: val mean AUC did not improve for {patience} epoch(s)")
                break
    accelerator.wait_for_everyone()
    return FitResult(out, state.best_auc, state.best_epoch, state.epoch, stopped_early, world, accelerator.is_main_process, history)


def _resumed_history(out: Path, epochs_done: int, is_main: bool) -> list[dict[str, Any]]:
    """metrics.jsonl up to the checkpoint's epoch: a run killed after logging an epoch but before
    checkpointing it redoes that epoch, so its line is dropped rather than duplicated."""
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    kept = [r for r in records if r["epoch"] <= epochs_done]
    if is_main and len(kept) != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _best_info(config: Config, record: dict[str, Any], manifest: dict) -> dict[str, Any]:
    return {
        "labels": list(LABELS),
        "arch": config.model.name,
        "recipe": config.recipe,
        "image_size": config.data.image_size,
        "eval_resize": config.data.eval_resize,
        "normalization": NORMALIZATION,
        "thresholds": record["val_thresholds"],
        "val_metrics": {k: record[k] for k in ("val_loss", "val_auc_mean", "val_ap_mean", "val_f1_mean", "val_auc", "val_f1")},
        "epoch": record["epoch"],
        "step": record["step"],
        "chexdist_version": __version__,
        "shards": {"image": manifest["image"], "split": manifest["split"], "source": manifest["source"]},
        "config": config_to_dict(config),
    }


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  step {record['step']}  lr {record['lr']:.2e}  "
        f"train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
        f"val_auc {record['val_auc_mean']:.4f}  val_f1 {record['val_f1_mean']:.4f}  {record['seconds']:.1f}s"
    )


def train_epoch(model, optimizer, criterion, accelerator, config: Config, loader, num_batches: int, state: TrainState,
                stop: StopFlag, checkpointer: Checkpointer, progress: bool = False) -> None:
    """One epoch of optimizer steps over `loader` (batches of images, targets), continuing from
    `state.batch`. The loader sends uint8 batches and `loader.normalize` finishes them on the device
    (12x less data to move than float batches). Public so `chexdist bench train` times exactly this code."""
    accum, clip = config.train.grad_accum, config.train.grad_clip
    device = accelerator.device
    normalize = getattr(loader, "normalize", torch.nn.Identity())
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), math.inf, device=device)
    resume_at = state.batch
    started = time.perf_counter() - state.epoch_seconds
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=num_batches, initial=resume_at, desc=f"epoch {state.epoch + 1}", leave=False,
               disable=not (progress and accelerator.is_local_main_process))
    for i, (images, targets) in enumerate(loader):
        if i < resume_at:
            continue
        group_start = i - i % accum
        group_size = min(accum, num_batches - group_start)
        sync = i + 1 == group_start + group_size
        images = normalize(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with accelerator.autocast():
                logits = model(images)
            loss = criterion(logits, targets)
            accelerator.backward(loss / group_size)
        detached = loss.detach()
        loss_sum += detached
        first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(detached), math.inf, float(state.step + 1)))
        state.batch = i + 1
        bar.update(1)
        if not sync:
            continue
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        last = state.batch == num_batches
        every = config.train.checkpoint_every
        if state.step % CHECK_EVERY == 0 or last or (every and state.step % every == 0):
            flags = accelerator.gather(torch.stack([torch.tensor(float(stop.raised), device=device), first_bad])[None])
            stop_requested, bad_step = bool(flags[:, 0].max() > 0), float(flags[:, 1].min())
            if math.isfinite(bad_step):
                raise NonFiniteLoss(
                    f"loss became nan/inf at step {int(bad_step)} (epoch {state.epoch + 1}); lower optim.lr, "
                    "set train.grad_clip, or use train.precision=bf16 instead of fp16"
                )
            _fold_loss(accelerator, state, loss_sum, i + 1 - resume_at)
            loss_sum.zero_()
            resume_at = i + 1
            state.epoch_seconds = time.perf_counter() - started
            bar.set_postfix(loss=f"{state.loss_sum / max(1, state.loss_batches):.4f}")
            if stop_requested:
                bar.close()
                raise Preempted(checkpointer.save())
            if every and state.step % every == 0 and not last:
                checkpointer.save()
    bar.close()
    state.epoch_seconds = time.perf_counter() - started


def _fold_loss(accelerator, state: TrainState, loss_sum: torch.Tensor, batches: int) -> None:
    """Add this rank's pending loss sum to the run state as the all-rank mean per batch."""
    total = accelerator.reduce(loss_sum.clone(), "sum").item()
    state.loss_sum += total / accelerator.num_processes
    state.loss_batches += batches
