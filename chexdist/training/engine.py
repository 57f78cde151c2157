"""THE training loop. `fit(config, out)` is used by train.py, Ray Tune trials and the demo; no other
copy exists. Accelerate handles devices, DDP and autocast; we build the loaders ourselves (each rank
reads its own part of the shards, equal batch counts from the manifest), so nothing is re-sharded.

A run directory holds: config.yaml, metrics.jsonl (one line per epoch), checkpoints/ (Accelerate
`save_state` folders, last K kept, renamed into place only when complete), best.safetensors +
best.json (the best epoch by val mean AUROC, with val-tuned thresholds).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexdist import __version__
from chexdist.config import BatchPlan, Config, eval_crop_warning, resolve_batch, save_config
from chexdist.data.lineage import shards_lineage, write_train_patients
from chexdist.data.loader import build_train_loader
from chexdist.data.batchaug import resolve_where, train_stages
from chexdist.data.transforms import eval_transform
from chexdist.errors import ChexdistError, NonFiniteLoss, Preempted
from chexdist.evaluation.inference import predict_split, split_loader
from chexdist.evaluation.metrics import per_class_metrics, tune_thresholds
from chexdist.models.arch import resolve_normalization
from chexdist.models.factory import create_model
from chexdist.runs import METRICS_FILE, best_info, export_best, read_metrics
from chexdist.training.checkpoint import Checkpointer, TrainState
from chexdist.training.ema import WeightEma, build_ema
from chexdist.training.losses import build_loss, pos_weight_from_counts
from chexdist.training.optim import build_optimizer, build_scheduler, step_scheduler
from chexdist.training.preflight import agreed_preflight
from chexdist.training.schedules import is_per_step, set_total_steps
from chexdist.training.switches import apply_switches, check_switches, compile_model, set_tf32
from chexdist.training.trackers import RunTrackers, accelerator_kwargs
from chexdist.utils.distributed import make_accelerator
from chexdist.utils.fileio import append_jsonl, atomic_write_json, atomic_write_jsonl
from chexdist.utils.progress import EpochProgress
from chexdist.utils.stopsignals import StopFlag

log = logging.getLogger("chexdist")

CHECK_EVERY = 10  # optimizer steps between the cross-rank checks for preemption and non-finite loss
PREEMPTED_MARKER = "PREEMPTED"  # in the run folder while the run waits for --resume after a signal
# Accelerate types whose state this loop handles (DDP or one process); FSDP/DeepSpeed/XLA/Megatron
# shard or place state differently (export_best on the main process alone would deadlock).
SUPPORTED_DISTRIBUTED = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA",
                         "MULTI_MUSA", "MULTI_HPU", "MULTI_NEURON"}

Report = Callable[[dict[str, Any]], None]


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


def _agreed_signal(accelerator, stop: StopFlag) -> int:
    """The stop signal all ranks act on (0: none): the first rank's that has one."""
    if accelerator.num_processes == 1:
        return stop.signum
    flags = accelerator.gather(torch.tensor([float(stop.signum)], device=accelerator.device))
    return _first_signal(flags)


def _first_signal(signums: torch.Tensor) -> int:
    raised = signums[signums > 0]
    return int(raised[0]) if len(raised) else 0


def _stop(checkpointer: Checkpointer, checkpoint: Path, signum: int) -> None:
    """Leave the run resumable and say so: rank 0 writes OUT/PREEMPTED (what a requeue script reads,
    since launchers turn the exit code into 1), then every rank raises Preempted."""
    state = checkpointer.state
    if checkpointer.accelerator.is_main_process:
        atomic_write_json(checkpointer.out / PREEMPTED_MARKER, {
            "signal": signal.Signals(signum).name,
            "checkpoint": str(checkpoint.resolve()),
            "epoch": state.epoch,
            "step": state.step,
            "batch": state.batch,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    raise Preempted(checkpoint, signum)


def clear_preempted(out: Path) -> None:
    (out / PREEMPTED_MARKER).unlink(missing_ok=True)


def accelerator_for(config: Config, out: Path | None = None):
    """Accelerator with train.precision passed explicitly: the launcher's --mixed_precision, the
    environment and the accelerate config apply only with train.precision=auto. With `out`, the
    trackers of train.log_with log under it (a missing tracker package is refused in one line)."""
    return make_accelerator(None if config.train.precision == "auto" else config.train.precision,
                            **accelerator_kwargs(config, out))


def _check_accelerator(accelerator, config: Config) -> None:
    kind = accelerator.distributed_type.value
    if kind not in SUPPORTED_DISTRIBUTED:
        raise ChexdistError(
            f"accelerate distributed type {kind} is not supported (chexdist runs DDP: NO, MULTI_GPU, MULTI_CPU and "
            "other MULTI_* device types); launch without --use_fsdp/--use_deepspeed and check `accelerate env`"
        )
    wanted = config.train.precision
    if wanted != "auto" and str(accelerator.mixed_precision) != wanted:
        raise ChexdistError(
            f"config key 'train.precision': {wanted}, but the Accelerator passed to fit runs {accelerator.mixed_precision}; "
            f"set train.precision={accelerator.mixed_precision} or auto"
        )


def _validate(model, accelerator, criterion, config: Config, manifest: dict, loader) -> dict[str, Any]:
    preds = predict_split(model, accelerator, config.data.shards, "val", config, manifest, loader=loader)
    if len(preds.targets) == 0:
        raise ChexdistError(f"{config.data.shards}: the val split has no readable samples; repack with a val split")
    val_loss = float(criterion(preds.logits, preds.targets))
    probs, targets = preds.probs, preds.targets.numpy()
    with warnings.catch_warnings():  # unscorable findings are named in the record (val_auc_undefined)
        warnings.filterwarnings("ignore", message="per_class_metrics: ")
        thresholds = tune_thresholds(probs, targets, metric=config.eval.threshold_metric)
        metrics = per_class_metrics(probs, targets, thresholds=thresholds)
    return {"val_loss": val_loss, "metrics": metrics, "skipped": preds.skipped, "probs": probs, "targets": targets}


def _epoch_record(state: TrainState, lr: float, val: dict, batch: BatchPlan, precision: str) -> dict[str, Any]:
    m = val["metrics"]
    return {
        "epoch": state.epoch,
        "step": state.step,
        "lr": lr,
        "base_lr": batch.lr,
        "global_batch": batch.global_batch,
        "batch_size": batch.batch_size,
        "grad_accum": batch.grad_accum,
        "train_loss": state.loss_sum / max(1, state.loss_batches),
        "val_loss": val["val_loss"],
        "val_auc_mean": m["auc_mean"],
        "val_ap_mean": m["ap_mean"],
        "val_f1_mean": m["f1_mean"],
        "val_auc": m["auc"],
        "val_ap": m["ap"],
        "val_f1": m["f1"],
        "val_thresholds": m["thresholds"],
        "val_auc_undefined": _unscorable(m["positives"], m["n"], "val"),
        "val_samples": m["n"],
        "val_skipped": val["skipped"],
        "seconds": state.epoch_seconds,
        "world_size": batch.world_size,
        "precision": precision,
    }


def _unscorable(positives: dict[str, int], n: int, split: str) -> dict[str, str]:
    """label -> why its AUROC/AP are null in the record (F1 too when the split has no positives)."""
    return {
        label: f"no {'positives' if k == 0 else 'negatives'} in {split}"
        for label, k in positives.items()
        if k == 0 or k == n
    }


@contextlib.contextmanager
def _process_state_restored():
    """fit sets process-wide state (deterministic algorithms, cuDNN flags, global RNGs, thread count);
    Ray Tune runs trial after trial in one worker process, so fit puts it all back on exit."""
    import random

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads(),
             random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None, torch.get_float32_matmul_precision())
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
        torch.set_float32_matmul_precision(saved[9])


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
    (Ray Tune passes one). `resume`: None, "latest" (or True), "auto" (latest if any, else fresh) or a
    checkpoint folder. On SIGTERM/SIGUSR1/SIGINT it saves at the next safe point (the next cross-rank
    check in an epoch, or right after validation or a save), writes OUT/PREEMPTED and raises Preempted;
    NonFiniteLoss on nan/inf; ChexdistError for anything `preflight` refuses."""
    owns_accelerator = accelerator is None
    accelerator = accelerator or accelerator_for(config, Path(out))
    trackers = RunTrackers(accelerator, config, Path(out))
    try:
        with StopFlag(announce=accelerator.is_main_process) as stop:
            return _fit(config, Path(out), resume, report, accelerator, progress, stop, trackers)
    finally:
        trackers.close(owns_accelerator)


@dataclass
class _Run:
    """What `fit` builds before its first epoch (torchtitan's trainer components), in one place so that
    each step of the run reads as a function of it."""

    config: Config  # as asked: config.yaml and best.json record it
    run_config: Config  # what the loop runs: per-process batch and accumulation as resolved
    out: Path
    accelerator: Any
    manifest: dict
    batch: BatchPlan
    precision: str
    normalization: Any
    model: Any
    optimizer: Any
    criterion: Any
    scheduler: Any
    state: TrainState
    checkpointer: Checkpointer
    ema: WeightEma | None = None
    lineage: dict[str, Any] = field(default_factory=dict)


def _fit(config: Config, out: Path, resume, report: Report | None, accelerator, progress: bool, stop: StopFlag,
         trackers: RunTrackers) -> FitResult:
    """The run in steps: agree on the preflight, build, resume, open the run folder; then per epoch train,
    validate, close the epoch, checkpoint, report, and stop early or on a signal; finish."""
    checked = agreed_preflight(accelerator, config, out, resume)
    _check_accelerator(accelerator, config)
    check_switches(config, accelerator.device, accelerator.num_processes)
    _set_backend_flags(config, accelerator)
    run = _build(config, out, accelerator, checked.manifest)
    if checked.resume_from is not None:
        _resume(run, checked.resume_from)
    _open_run_folder(run)
    history = _resumed_history(out, run.state.epoch, accelerator.is_main_process)
    loader, num_batches, val_loader = _loaders(run)
    if is_per_step(run.scheduler):
        set_total_steps(run.scheduler, config.train.epochs, num_batches, run.batch.grad_accum)
    state, stopped_early = run.state, False
    trackers.start(state.step, run.batch.global_batch)
    after_step = _after_step(run, trackers)
    while state.epoch < config.train.epochs:
        loader.set_epoch(state.epoch, start_batch=state.batch)
        train_epoch(run.model, run.optimizer, run.criterion, accelerator, run.run_config, loader, num_batches, state, stop,
                    run.checkpointer, progress, after_step=after_step)
        val = _validate(run.model, accelerator, run.criterion, run.run_config, run.manifest, val_loader)
        ema_val = _validate(run.ema.module, accelerator, run.criterion, run.run_config, run.manifest, val_loader) if run.ema else None
        record = _close_epoch(run, val, ema_val)
        trackers.log_epoch(record, val, ema_val, best=state.best_epoch == record["epoch"])
        history.append(record)
        saved = run.checkpointer.save()
        if report is not None:
            report(record)
        if stopped_early := _early_stop(run):
            break
        if state.epoch < config.train.epochs and (signum := _agreed_signal(accelerator, stop)):
            _stop(run.checkpointer, saved, signum)  # a signal during validation, export_best or the save
    return _finish(run, history, stopped_early, trackers)


def _after_step(run: _Run, trackers: RunTrackers) -> Callable[[TrainState, torch.Tensor], None]:
    """What follows each optimizer step: a per-step schedule's step, the EMA update, the tracker log."""
    per_step = is_per_step(run.scheduler)
    raw = run.accelerator.unwrap_model(run.model)

    def after(state: TrainState, loss: torch.Tensor) -> None:
        lr = run.optimizer.param_groups[0]["lr"]  # the lr this step was taken with
        if per_step:
            run.scheduler.step()
        if run.ema is not None:
            run.ema.update(raw, state.step)
        trackers.log_step(state.step, loss, lr)

    return after


def _set_backend_flags(config: Config, accelerator) -> None:
    if config.train.tf32 and accelerator.device.type == "cuda":
        set_tf32(True)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _build(config: Config, out: Path, accelerator, manifest: dict) -> _Run:
    """Model, loss, optimizer and scheduler from `config`, prepared by Accelerate, with a fresh loop
    state. Seeded with train.seed (the same initial weights on every rank), then train.seed + rank."""
    from accelerate.utils import set_seed

    world, rank = accelerator.num_processes, accelerator.process_index
    batch = resolve_batch(config, world)
    set_seed(config.train.seed)
    model = create_model(
        config.model.name, pretrained=config.model.pretrained, drop_rate=config.model.drop_rate, head=config.model.head
    )
    train_info = manifest["splits"]["train"]
    pos_weight = pos_weight_from_counts(train_info["positives"], train_info["samples"], negatives=train_info.get("negatives")) if config.loss.name == "wbce" else None
    criterion = build_loss(config.loss.name, gamma=config.loss.gamma, alpha=config.loss.alpha, pos_weight=pos_weight)
    normalization = resolve_normalization(model)
    model = apply_switches(model, config, world)
    optimizer = build_optimizer(config.optim, model, lr=batch.lr)
    scheduler = build_scheduler(config.sched, optimizer, config.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = build_ema(config, accelerator.unwrap_model(model))
    compile_model(accelerator.unwrap_model(model), config)
    state = TrainState(world_size=world, num_workers=config.data.num_workers, batch_size=batch.batch_size, grad_accum=batch.grad_accum)
    checkpointer = Checkpointer(accelerator, out, state, scheduler, config.train.keep_checkpoints, extra={"ema": ema} if ema else None)
    set_seed(config.train.seed + rank)
    return _Run(config, _with_batch(config, batch), out, accelerator, manifest, batch, str(accelerator.mixed_precision),
                normalization, model, optimizer, criterion, scheduler, state, checkpointer, ema)


def _resume(run: _Run, checkpoint: Path) -> None:
    state = run.state
    run.checkpointer.load(checkpoint, run.config.train.seed)
    run.accelerator.print(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.step}, batch {state.batch})")


def _open_run_folder(run: _Run) -> None:
    """Write config.yaml, clear a PREEMPTED marker (rank 0), and say what runs and how."""
    accelerator, config, batch = run.accelerator, run.config, run.batch
    run.lineage = {"shards": shards_lineage(config.data.shards)}
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(config, run.out / "config.yaml")
        clear_preempted(run.out)
        run.lineage["train_patients"] = write_train_patients(config.data.shards, run.out)
    accelerator.print(_banner(config, accelerator, run.precision, run.manifest["splits"]["train"]["samples"]))
    accelerator.print(
        f"global batch {batch.global_batch} = {batch.batch_size} per process x {accelerator.num_processes} x grad_accum {batch.grad_accum}, "
        f"lr {batch.lr:.3g}" + (f" ({config.optim.lr_scaling} scaling of {config.optim.lr:.3g} at batch "
                                f"{config.optim.lr_reference_batch})" if config.optim.lr_scaling != "none" else "")
    )
    if accelerator.is_main_process and (warning := eval_crop_warning(config)):
        log.warning(warning)


def _loaders(run: _Run):
    """(train loader, its batches per epoch, val loader), built once for the run (persistent workers)."""
    config, accelerator = run.config, run.accelerator
    run.run_config.aug.where = resolve_where(config.aug.where, accelerator.device)  # best.json aug_where says which ran
    source_size = int(run.manifest.get("image", {}).get("size") or 0)  # the device resizes from the packed size
    transform, augment = train_stages(config, run.normalization, run.run_config.aug.where == "device", source_size)
    loader, num_batches = build_train_loader(
        config.data.shards,
        run.batch.batch_size,
        transform,
        config.data.num_workers,
        accelerator.num_processes,
        accelerator.process_index,
        seed=config.train.seed,
        epoch=run.state.epoch,
        shuffle_buffer=config.data.shuffle_buffer,
        max_batches=config.data.max_train_batches,
        manifest=run.manifest,
        pin_memory=accelerator.device.type == "cuda",
        normalize_in_loader=False,
        persistent_workers=True,
        batch_augment=augment,
        decode_device=config.data.decode_device,  # cuda: JPEG batches decoded by nvJPEG in this process
    )
    val_loader = split_loader(accelerator, config.data.shards, "val", run.run_config, run.manifest,
                              transform=eval_transform(run.run_config, run.normalization), persistent_workers=True)
    return loader, num_batches, val_loader


EMA_KEYS = ("val_loss", "val_auc_mean", "val_ap_mean", "val_f1_mean", "val_auc", "val_ap", "val_f1", "val_thresholds")


def _close_epoch(run: _Run, val: dict[str, Any], ema_val: dict[str, Any] | None = None) -> dict[str, Any]:
    """After an epoch's validation: step the scheduler, keep the early-stopping memory, start the next
    epoch's position; rank 0 logs the record and exports a new best (the EMA weights when they score a
    higher val mean AUROC than the raw ones). Returns the metrics.jsonl record."""
    state, accelerator = run.state, run.accelerator
    step_scheduler(run.scheduler, val["val_loss"])
    state.epoch += 1
    lr = run.optimizer.param_groups[0]["lr"]
    record = _epoch_record(state, lr, val, run.batch, run.precision)
    chosen, weights = record, "raw"
    if ema_val is not None:
        ema_record = _epoch_record(state, lr, ema_val, run.batch, run.precision)
        record["val_ema"] = {k: ema_record[k] for k in EMA_KEYS}
        if ema_record["val_auc_mean"] > record["val_auc_mean"]:
            chosen, weights = ema_record, "ema"
        record["better_weights"] = weights
    record["data"] = run.lineage.get("shards")
    improved = chosen["val_auc_mean"] > state.best_auc
    if improved:
        state.best_auc, state.best_epoch, state.bad_epochs = chosen["val_auc_mean"], state.epoch, 0
    else:
        state.bad_epochs += 1
    state.batch, state.loss_sum, state.loss_batches, state.epoch_seconds = 0, 0.0, 0, 0.0
    if accelerator.is_main_process:
        append_jsonl(run.out / METRICS_FILE, record)
        accelerator.print(_format_epoch(record, run.config.train.epochs))
        if improved:
            model = run.ema.module if weights == "ema" else accelerator.unwrap_model(run.model)
            info = best_info(run.config, chosen, run.manifest, run.normalization, weights=weights, lineage=run.lineage)
            info["aug_where"] = run.run_config.aug.where
            export_best(model, run.out, info)
    return record


def _early_stop(run: _Run) -> bool:
    patience = run.config.train.early_stop_patience
    if patience and run.state.bad_epochs >= patience:
        run.accelerator.print(f"early stop: val mean AUC did not improve for {patience} epoch(s)")
        return True
    return False


def _finish(run: _Run, history: list[dict[str, Any]], stopped_early: bool, trackers: RunTrackers) -> FitResult:
    accelerator, state = run.accelerator, run.state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_preempted(run.out)
    if state.best_epoch < 0:
        last = history[-1] if history else {}
        raise ChexdistError(
            f"{run.config.data.shards}: no epoch could be scored, so no best model was exported: val mean AUROC is "
            f"undefined when no finding has both positives and negatives among the {last.get('val_samples', 0)} val "
            "images (see val_auc_undefined in metrics.jsonl); repack with a larger val split"
        )
    trackers.log_best_images(run.run_config, run.manifest, state.step)  # rank 0: ROC and Grad-CAM of the best epoch
    return FitResult(run.out, state.best_auc, state.best_epoch, state.epoch, stopped_early, accelerator.num_processes,
                     accelerator.is_main_process, history)


def _resumed_history(out: Path, epochs_done: int, is_main: bool) -> list[dict[str, Any]]:
    """metrics.jsonl up to the checkpoint's epoch: a run killed after logging an epoch but before
    checkpointing it redoes that epoch, so its line is dropped rather than duplicated."""
    records = read_metrics(out)
    kept = [r for r in records if r["epoch"] <= epochs_done]
    if is_main and len(kept) != len(records):
        atomic_write_jsonl(out / METRICS_FILE, kept)
    return kept


def _with_batch(config: Config, batch: BatchPlan) -> Config:
    """The config the loop runs: per-process batch and accumulation as resolved (config.yaml keeps
    what the user asked for)."""
    run = copy.deepcopy(config)
    run.data.batch_size, run.train.grad_accum = batch.batch_size, batch.grad_accum
    return run


def _banner(config: Config, accelerator, precision: str, train_images: int) -> str:
    """e.g. 'chexdist 0.1.0: densenet121 on 2 processes (MULTI_CPU, cpu), precision no, train 8000 images'."""
    world = accelerator.num_processes
    kind = accelerator.distributed_type.value
    where = accelerator.device.type.upper() if kind == "NO" else f"{kind}, {accelerator.device.type}"
    return (
        f"chexdist {__version__}: {config.model.name} on {world} process{'es' if world != 1 else ''} ({where}), "
        f"precision {precision}, train {train_images} images, eval Resize {config.data.resolved_eval_resize} + "
        f"CenterCrop {config.data.image_size}"
    )


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    undefined = record["val_auc_undefined"]
    return (
        f"epoch {record['epoch']}/{epochs}  step {record['step']}  lr {record['lr']:.2e}  "
        f"train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
        f"val_auc {record['val_auc_mean']:.4f}  val_f1 {record['val_f1_mean']:.4f}  {record['seconds']:.1f}s"
        + (f"  ({len(undefined)}/{len(record['val_auc'])} findings unscorable in val)" if undefined else "")
    )


def train_epoch(model, optimizer, criterion, accelerator, config: Config, loader, num_batches: int, state: TrainState,
                stop: StopFlag, checkpointer: Checkpointer, progress: bool = False,
                after_step: Callable[[TrainState, torch.Tensor], None] | None = None) -> None:
    """One epoch of optimizer steps over `loader` (batches of images, targets), continuing from
    `state.batch`: the loader starts there (`loader.set_epoch(epoch, start_batch)`), so nothing is
    decoded twice. The loader sends uint8 batches and `loader.finish` (normalization, or with
    aug.where=device the batch augmentation) finishes them on the device (12x less data to move).
    `after_step(state, loss)` runs after each optimizer step (per-step schedule, EMA, trackers). Public so `chexdist bench train` times exactly this code."""
    accum, clip = config.train.grad_accum, config.train.grad_clip
    device = accelerator.device
    normalize = getattr(loader, "normalize", torch.nn.Identity())
    finish = getattr(loader, "finish", lambda images, index: normalize(images))  # index: the augmentation's seed
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), math.inf, device=device)
    resume_at = state.batch
    started = time.perf_counter() - state.epoch_seconds
    model.train()
    bar = EpochProgress(num_batches, resume_at, f"epoch {state.epoch + 1}/{config.train.epochs}",
                        enabled=progress and accelerator.is_local_main_process, log_every_s=config.train.log_every_s,
                        images_per_batch=config.data.batch_size * accelerator.num_processes)

    def running_loss() -> float:
        return (state.loss_sum + loss_sum.item()) / max(1, state.loss_batches + state.batch - resume_at)

    for i, (images, targets) in enumerate(loader, start=resume_at):
        group_start = i - i % accum
        group_size = min(accum, num_batches - group_start)
        sync = i + 1 == group_start + group_size
        images = finish(images.to(device, non_blocking=True), i).contiguous(memory_format=memory_format)
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
        bar.update(running_loss, optimizer.param_groups[0]["lr"], state.step)
        if not sync:
            continue
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if after_step is not None:
            after_step(state, detached)
        last = state.batch == num_batches
        every = config.train.checkpoint_every
        # only at these steps (where the loss is folded) so that a resumed run sums it as an unbroken one
        if state.step % CHECK_EVERY == 0 or last or (every and state.step % every == 0):
            signum = _check_ranks(accelerator, stop, first_bad, state.epoch)
            _fold_loss(accelerator, state, loss_sum, i + 1 - resume_at)
            loss_sum.zero_()
            resume_at = i + 1
            state.epoch_seconds = time.perf_counter() - started
            if signum:
                bar.close()
                _stop(checkpointer, checkpointer.save(), signum)
            if every and state.step % every == 0 and not last:
                saved = checkpointer.save()
                if signum := _agreed_signal(accelerator, stop):  # arrived during the save
                    bar.close()
                    _stop(checkpointer, saved, signum)
    bar.close()
    state.epoch_seconds = time.perf_counter() - started


def _check_ranks(accelerator, stop: StopFlag, first_bad: torch.Tensor, epoch: int) -> int:
    """The cross-rank check: NonFiniteLoss if any rank's loss was nan/inf (at the first such step),
    else the stop signal all ranks act on (0: none)."""
    flags = accelerator.gather(torch.stack([torch.tensor(float(stop.signum), device=accelerator.device), first_bad])[None])
    bad_step = float(flags[:, 1].min())
    if math.isfinite(bad_step):
        raise NonFiniteLoss(
            f"loss became nan/inf at step {int(bad_step)} (epoch {epoch + 1}); lower optim.lr, "
            "set train.grad_clip, or use train.precision=bf16 instead of fp16"
        )
    return _first_signal(flags[:, 0])


def _fold_loss(accelerator, state: TrainState, loss_sum: torch.Tensor, batches: int) -> None:
    """Add this rank's pending loss sum to the run state as the all-rank mean per batch."""
    total = accelerator.reduce(loss_sum.clone(), "sum").item()
    state.loss_sum += total / accelerator.num_processes
    state.loss_batches += batches
