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
import shutil
import signal
import threading
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
from chexdist.config import BatchPlan, Config, config_from_dict, config_to_dict, eval_crop_warning, load_yaml, resolve_batch, save_config
from chexdist.data.loader import build_train_loader
from chexdist.errors import ChexdistError, NonFiniteLoss, Preempted, SameOnAllRanks
from chexdist.training.checkpoint import SHAPE_KEYS, TrainState, checkpoint_name, list_checkpoints
from chexdist.runs import METRICS_FILE, best_info, export_best, read_metrics
from chexdist.utils.distributed import make_accelerator
from chexdist.utils.fileio import append_jsonl, atomic_write_json, atomic_write_jsonl
from chexdist.evaluation.inference import predict_split, split_loader
from chexdist.training.losses import build_loss, pos_weight_from_counts
from chexdist.evaluation.metrics import per_class_metrics, tune_thresholds
from chexdist.models.arch import resolve_normalization
from chexdist.models.factory import create_model
from chexdist.training.optim import build_optimizer, build_scheduler, step_scheduler
from chexdist.utils.progress import EpochProgress
from chexdist.data.shardformat import load_manifest, split_shards
from chexdist.utils.stopsignals import STOP_SIGNALS
from chexdist.data.transforms import build_transform, eval_transform

log = logging.getLogger("chexdist")

CHECK_EVERY = 10  # optimizer steps between the cross-rank checks for preemption and non-finite loss
# Keys a --resume may change. data.num_workers changes the data plan: allowed at an epoch boundary,
# refused mid-epoch by the shape check (see SHAPE_KEYS).
RESUMABLE_KEYS = {"train.epochs", "data.num_workers", "data.shards", "eval.bootstrap", "train.log_every_s"}
PREEMPTED_MARKER = "PREEMPTED"  # in the run folder while the run waits for --resume after a signal
# What an epoch's data plan and step grouping depend on besides the config: stored in
# trainer_state.pt, compared on --resume (TrainState field -> how the user sets it).
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


class StopFlag:
    """Records the first SIGTERM/SIGUSR1 (SLURM preemption) or SIGINT (Ctrl-C) so the loop checkpoints
    at the next safe point. After a SIGINT, SIGINT gets its default action again, so a second Ctrl-C
    ends the process at once (a checkpoint is written under a temp name, so none is left half-done).
    Shard readers and DataLoader workers receive these signals too and ignore them: the loop's rank
    acts (`chexdist.utils.stopsignals`)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopFlag:
        from chexdist.training.launcher import held_stop_signals

        if _in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            for signum in held_stop_signals():  # arrived while train.py was starting
                self._handle(signum, None)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.signum:
            return
        self.signum = signum
        if self.announce:
            again = "; Ctrl-C again aborts without saving" if signum == signal.SIGINT else ""
            log.warning("received %s: will checkpoint and stop at the next safe point%s", signal.Signals(signum).name, again)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------- checkpoints


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

    @classmethod
    def check_complete(cls, path: Path) -> None:
        if not (path / cls.STATE_FILE).is_file():
            raise ChexdistError(f"{path}: not a complete chexdist checkpoint (no {cls.STATE_FILE})")

    def load(self, path: Path, seed: int) -> None:
        """Restore `path` into a run whose state holds the current shape (SHAPE_KEYS).

        Another shape is allowed at an epoch boundary and said in one line; mid-epoch it is refused
        (the rest of the epoch was planned for the old shape). RNG states are restored only on the
        same world size with every rank's file present; otherwise each rank is reseeded from
        (seed, epoch, rank) and that is said in one line, instead of Accelerate's silent skip.
        """
        acc = self.accelerator
        self.check_complete(path)
        saved = torch.load(path / self.STATE_FILE, map_location="cpu", weights_only=True)
        now = {k: getattr(self.state, k) for k in SHAPE_KEYS}
        was = {k: saved["train_state"].get(k, 0) for k in SHAPE_KEYS}
        changed = {k: (was[k], now[k]) for k in SHAPE_KEYS if was[k] and was[k] != now[k]}
        mid_epoch = saved["train_state"].get("batch", 0) > 0
        if changed and mid_epoch:
            raise ChexdistError(_shape_refusal(path, saved["train_state"], changed))
        if changed:
            acc.print(f"resuming at an epoch boundary on another shape ({_describe(changed)}): the next epochs are planned for the new one")
        elif mid_epoch and not was["world_size"]:
            acc.print(f"{path}: checkpoint predates shape recording; assuming it was saved on this shape")
        rng_files = sorted(path.glob("random_states_*.pkl"))
        acc.load_state(str(path))
        self.state.load_state_dict(saved["train_state"])
        self.scheduler.load_state_dict(saved["scheduler"])
        expected = [path / f"random_states_{r}.pkl" for r in range(acc.num_processes)]
        if not all(f in rng_files for f in expected) or len(rng_files) != acc.num_processes:
            from accelerate.utils import set_seed

            set_seed(int(np.random.SeedSequence([seed, self.state.epoch, acc.process_index]).generate_state(1)[0]))
            acc.print(
                f"RNG states not restored: {path.name} holds {len(rng_files)} rank state(s), this run has "
                f"{acc.num_processes} process(es); each rank reseeded from (train.seed, epoch, rank)"
            )
        for key, value in now.items():
            setattr(self.state, key, value)


def _describe(changed: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{SHAPE_KEYS[k]} {old} -> {new}" for k, (old, new) in changed.items())


def _shape_refusal(path: Path, saved: dict[str, Any], changed: dict[str, tuple[int, int]]) -> str:
    old = {k: saved[k] for k in SHAPE_KEYS}
    return (
        f"{path}: saved mid-epoch (epoch {saved['epoch'] + 1}, batch {saved['batch']}) on another shape "
        f"({_describe(changed)}); the rest of that epoch is planned for the old shape, so resume it with "
        f"{old['world_size']} process(es) and data.num_workers={old['num_workers']} (per-process batch "
        f"{old['batch_size']}, train.grad_accum {old['grad_accum']}); from the next epoch-boundary checkpoint on, "
        "any shape can resume"
    )


def _resolve_resume(out: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint to continue from: `latest` (or True) must find one, `auto` starts fresh when
    there is none (SLURM requeue scripts pass it on every start), anything else is a folder."""
    if not resume:
        return None
    if resume is True or resume in ("latest", "auto"):
        found = list_checkpoints(out)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise ChexdistError(f"{out}: --resume found no checkpoint under {out / 'checkpoints'}; use --resume auto to start fresh when there is none")
    path = Path(resume)
    if not path.is_dir():
        raise ChexdistError(f"--resume {path}: not a checkpoint folder")
    Checkpointer.check_complete(path)
    return path


@dataclass
class Preflight:
    """What `preflight` checked and decided: the manifest, and the checkpoint to resume (None: fresh)."""

    manifest: dict
    resume_from: Path | None


def preflight(config: Config, out: str | os.PathLike, resume: bool | str | None) -> Preflight:
    """Every check that needs no process group: config, shards manifest, run folder against --resume,
    resume state. `chexdist train --nproc N` runs it before starting any worker; `fit` runs it on rank 0."""
    out = Path(out)
    if not config.data.shards:
        raise ChexdistError("config key 'data.shards' is empty; pass --shards DIR or --set data.shards=DIR")
    manifest = load_manifest(config.data.shards)
    for split in ("train", "val"):
        if sum(entry["samples"] for entry in split_shards(manifest, split, str(config.data.shards))) == 0:
            raise ChexdistError(f"{config.data.shards}: the {split} split is empty; repack with a {split} split")
    resume_from = _resolve_resume(out, resume)
    if resume_from is None and resume != "auto" and list_checkpoints(out):
        raise ChexdistError(f"{out}: already has checkpoints; pass --resume to continue it or choose a new --out")
    if resume_from is not None:
        _check_resume_config(out, config)
    return Preflight(manifest, resume_from)


def _agreed_preflight(accelerator, config: Config, out: Path, resume: bool | str | None) -> Preflight:
    """Rank 0 runs `preflight` and every rank follows its answer, so nodes never disagree about the
    run folder (which checkpoint is latest, whether there is one). Multi-node needs a shared filesystem."""
    if accelerator.num_processes == 1:
        return preflight(config, out, resume)
    from accelerate.utils import broadcast_object_list

    answer: list[Preflight | str | None] = [None]
    if accelerator.is_main_process:
        try:
            answer[0] = preflight(config, out, resume)
        except ChexdistError as exc:
            answer[0] = str(exc)
    broadcast_object_list(answer)
    if isinstance(answer[0], str):
        raise SameOnAllRanks(answer[0])
    return answer[0]


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


# ----------------------------------------------------------------------------------- the loop


def _make_accelerator(config: Config):
    """Accelerator with train.precision passed explicitly: the launcher's --mixed_precision, the
    environment and the accelerate config apply only with train.precision=auto."""
    return make_accelerator(None if config.train.precision == "auto" else config.train.precision)


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
    return {"val_loss": val_loss, "metrics": metrics, "skipped": preds.skipped}


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
    (Ray Tune passes one). `resume`: None, "latest" (or True), "auto" (latest if any, else fresh) or a
    checkpoint folder. On SIGTERM/SIGUSR1/SIGINT it saves at the next safe point (the next cross-rank
    check in an epoch, or right after validation or a save), writes OUT/PREEMPTED and raises Preempted;
    NonFiniteLoss on nan/inf; ChexdistError for anything `preflight` refuses."""
    accelerator = accelerator or _make_accelerator(config)
    with StopFlag(announce=accelerator.is_main_process) as stop:
        return _fit(config, Path(out), resume, report, accelerator, progress, stop)


def _fit(config: Config, out: Path, resume, report: Report | None, accelerator, progress: bool, stop: StopFlag) -> FitResult:
    checked = _agreed_preflight(accelerator, config, out, resume)
    manifest, resume_from = checked.manifest, checked.resume_from
    _check_accelerator(accelerator, config)
    from accelerate.utils import set_seed

    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    world, rank = accelerator.num_processes, accelerator.process_index
    precision = str(accelerator.mixed_precision)
    batch = resolve_batch(config, world)
    run_config = _with_batch(config, batch)

    set_seed(config.train.seed)
    model = create_model(
        config.model.name, pretrained=config.model.pretrained, drop_rate=config.model.drop_rate, head=config.model.head
    )
    train_info = manifest["splits"]["train"]
    pos_weight = pos_weight_from_counts(train_info["positives"], train_info["samples"]) if config.loss.name == "wbce" else None
    criterion = build_loss(config.loss.name, gamma=config.loss.gamma, alpha=config.loss.alpha, pos_weight=pos_weight)
    normalization = resolve_normalization(model)
    optimizer = build_optimizer(config.optim, model, lr=batch.lr)
    scheduler = build_scheduler(config.sched, optimizer, config.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState(world_size=world, num_workers=config.data.num_workers, batch_size=batch.batch_size, grad_accum=batch.grad_accum)
    checkpointer = Checkpointer(accelerator, out, state, scheduler, config.train.keep_checkpoints)
    set_seed(config.train.seed + rank)

    if resume_from is not None:
        checkpointer.load(resume_from, config.train.seed)
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.step}, batch {state.batch})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        clear_preempted(out)
    accelerator.print(_banner(config, accelerator, precision, train_info["samples"]))
    accelerator.print(
        f"global batch {batch.global_batch} = {batch.batch_size} per process x {world} x grad_accum {batch.grad_accum}, "
        f"lr {batch.lr:.3g}" + (f" ({config.optim.lr_scaling} scaling of {config.optim.lr:.3g} at batch "
                                f"{config.optim.lr_reference_batch})" if config.optim.lr_scaling != "none" else "")
    )
    if accelerator.is_main_process and (warning := eval_crop_warning(config)):
        log.warning(warning)

    transform = build_transform(
        config.aug.preset,
        image_size=config.data.image_size,
        eval_resize=config.data.resolved_eval_resize,
        train=True,
        brightness=config.aug.brightness,
        contrast=config.aug.contrast,
        scale_min=config.aug.scale_min,
        degrees=config.aug.degrees,
        translate=config.aug.translate,
        normalization=normalization,
    )
    history = _resumed_history(out, state.epoch, accelerator.is_main_process)
    stopped_early = False
    loader, num_batches = build_train_loader(
        config.data.shards,
        batch.batch_size,
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
        persistent_workers=True,
    )
    val_loader = split_loader(accelerator, config.data.shards, "val", run_config, manifest,
                              transform=eval_transform(run_config, normalization), persistent_workers=True)
    while state.epoch < config.train.epochs:
        loader.set_epoch(state.epoch, start_batch=state.batch)
        train_epoch(model, optimizer, criterion, accelerator, run_config, loader, num_batches, state, stop, checkpointer, progress)
        val = _validate(model, accelerator, criterion, run_config, manifest, val_loader)
        step_scheduler(scheduler, val["val_loss"])
        state.epoch += 1
        lr = optimizer.param_groups[0]["lr"]
        record = _epoch_record(state, lr, val, batch, precision)
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
                export_best(accelerator.unwrap_model(model), out, best_info(config, record, manifest, normalization))
        saved = checkpointer.save()
        if report is not None:
            report(record)
        patience = config.train.early_stop_patience
        if patience and state.bad_epochs >= patience:
            stopped_early = True
            accelerator.print(f"early stop: val mean AUC did not improve for {patience} epoch(s)")
            break
        if state.epoch < config.train.epochs and (signum := _agreed_signal(accelerator, stop)):
            _stop(checkpointer, saved, signum)  # a signal during validation, export_best or the save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_preempted(out)
    if state.best_epoch < 0:
        last = history[-1] if history else {}
        raise ChexdistError(
            f"{config.data.shards}: no epoch could be scored, so no best model was exported: val mean AUROC is "
            f"undefined when no finding has both positives and negatives among the {last.get('val_samples', 0)} val "
            "images (see val_auc_undefined in metrics.jsonl); repack with a larger val split"
        )
    return FitResult(out, state.best_auc, state.best_epoch, state.epoch, stopped_early, world, accelerator.is_main_process, history)


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
                stop: StopFlag, checkpointer: Checkpointer, progress: bool = False) -> None:
    """One epoch of optimizer steps over `loader` (batches of images, targets), continuing from
    `state.batch`: the loader starts there (`loader.set_epoch(epoch, start_batch)`), so nothing is
    decoded twice. The loader sends uint8 batches and `loader.normalize` finishes them on the device
    (12x less data to move than float batches). Public so `chexdist bench train` times exactly this code."""
    accum, clip = config.train.grad_accum, config.train.grad_clip
    device = accelerator.device
    normalize = getattr(loader, "normalize", torch.nn.Identity())
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
        bar.update(running_loss, optimizer.param_groups[0]["lr"], state.step)
        if not sync:
            continue
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        last = state.batch == num_batches
        every = config.train.checkpoint_every
        # only at these steps (where the loss is folded) so that a resumed run sums it as an unbroken one
        if state.step % CHECK_EVERY == 0 or last or (every and state.step % every == 0):
            flags = accelerator.gather(torch.stack([torch.tensor(float(stop.signum), device=device), first_bad])[None])
            signum, bad_step = _first_signal(flags[:, 0]), float(flags[:, 1].min())
            if math.isfinite(bad_step):
                raise NonFiniteLoss(
                    f"loss became nan/inf at step {int(bad_step)} (epoch {state.epoch + 1}); lower optim.lr, "
                    "set train.grad_clip, or use train.precision=bf16 instead of fp16"
                )
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


def _fold_loss(accelerator, state: TrainState, loss_sum: torch.Tensor, batches: int) -> None:
    """Add this rank's pending loss sum to the run state as the all-rank mean per batch."""
    total = accelerator.reduce(loss_sum.clone(), "sum").item()
    state.loss_sum += total / accelerator.num_processes
    state.loss_batches += batches
