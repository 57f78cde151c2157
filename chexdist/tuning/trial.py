"""One trial of a search: `run_trial` runs `chexdist.training.engine.fit`, the one training loop, in
this process or as a Ray Train `TorchTrainer` DDP job (`workers_per_trial > 1`), reports every epoch
to Ray with a staged checkpoint, and continues from a Ray checkpoint (same parameters: resume; a PBT
clone: a new run from the donor's weights).

Ray is imported inside functions only, so that `chexdist` works without the [tune] extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chexdist.config import Config, apply_overrides, config_from_dict, config_to_dict, load_yaml
from chexdist.data.shardformat import is_remote
from chexdist.errors import ChexdistError
from chexdist.tuning.space import SearchSpace
from chexdist.utils.fileio import append_jsonl, atomic_write_text, dumps_json, json_safe

RUN_DIR = "run"  # the trial's chexdist run folder, inside its trial folder
HISTORY_FILE = "epochs.jsonl"  # in the trial folder: every epoch the trial reported (our record, not Ray's)
STATE_FILE = "tune_state.json"  # in a trial checkpoint: the trial's parameters and epoch offset
INIT_WEIGHTS = "pbt-init.safetensors"  # donor weights a PBT-exploited trial starts from


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled parameters (passed with tune.with_parameters)."""

    base: dict[str, Any]  # config_to_dict of the config all trials start from
    space: SearchSpace
    experiment_dir: str  # local path or URL of the experiment
    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    max_failures: int = 0


def trial_config(setup: TrialSetup, sampled: Mapping[str, Any]) -> tuple[Config, dict[str, Any]]:
    """The trial's config and its overrides. The run folder keeps one engine checkpoint: Ray keeps the
    trial's checkpoint history in storage."""
    overrides = setup.space.active(sampled)
    return apply_overrides(config_from_dict(setup.base), {**overrides, "train.keep_checkpoints": 1}), overrides


def check_shards_visible(shards: str) -> None:
    """A trial on a node that cannot see the shards fails with one line naming the path and node."""
    if is_remote(shards):
        return
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        raise ChexdistError(
            f"data.shards {shards}: not visible on node {socket.gethostname()}; every Ray node must see the "
            "shards at this path (shared filesystem) or read them by URL"
        )


def _trial_folder(setup: TrialSetup, local_trial_dir: str) -> Path:
    """The trial's folder in the experiment (local storage) or Ray's local trial folder (URL storage)."""
    if is_remote(setup.experiment_dir):
        return Path(local_trial_dir)
    return Path(setup.experiment_dir) / Path(local_trial_dir).name


def _trial_metrics(record: dict[str, Any], epoch_offset: int) -> dict[str, Any]:
    """The engine's epoch record for Ray: epochs counted over the whole trial (PBT restarts included),
    NaN (a class without positives in val) as null so Ray's result.json stays strict JSON."""
    metrics = json_safe({k: v for k, v in record.items() if k != "val_thresholds"})
    metrics["epoch"] = record["epoch"] + epoch_offset
    return metrics


@contextlib.contextmanager
def staged_checkpoint(run: Path, state: dict[str, Any]) -> Iterator[Path]:
    """A folder with what a trial needs to continue: config, metrics, best export and only the newest
    engine checkpoint (hard links where possible, so staging costs no copy). Ray copies it to storage."""
    from chexdist.training.checkpoint import list_checkpoints

    stage = Path(tempfile.mkdtemp(prefix=".ray-ckpt-", dir=run.parent))
    try:
        for name in ("config.yaml", "metrics.jsonl", "best.json", "best.safetensors", INIT_WEIGHTS):
            if (run / name).is_file():
                _link_or_copy(run / name, stage / name)
        latest = list_checkpoints(run)[-1]
        shutil.copytree(latest, stage / "checkpoints" / latest.name, copy_function=_link_or_copy)
        (stage / STATE_FILE).write_text(dumps_json(state))  # a copy: the run folder's own may be rewritten
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def plan_restore(checkpoint_dir: Path, run: Path, config: Config, overrides: dict[str, Any]) -> tuple[Config, bool, int]:
    """How a trial continues from a Ray checkpoint: (config to fit, resume?, epoch offset).

    The same parameters continue exactly (`fit(resume=True)`). Other parameters mean PBT cloned a
    better trial and mutated lr/augmentation: the engine refuses changed settings on resume (and its
    optimizer state would undo a new lr), so the trial starts a new run from the donor's weights for
    the epochs left. Pure: every rank of a multi-process trial computes the same answer."""
    from chexdist.training.checkpoint import checkpoint_position, list_checkpoints

    state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    if state["params"] == overrides:
        saved = _saved_config(checkpoint_dir, config)
        if saved.model.pretrained:
            saved = apply_overrides(saved, {"model.pretrained": str(run / INIT_WEIGHTS)})
        return saved, True, state["epoch_offset"]
    donor = list_checkpoints(checkpoint_dir)[-1]
    done = state["epoch_offset"] + checkpoint_position(donor).epoch
    left = config.train.epochs - done
    return apply_overrides(config, {"model.pretrained": str(run / INIT_WEIGHTS), "train.epochs": max(1, left)}), False, done


def materialize_restore(checkpoint_dir: Path, run: Path, config: Config, resume: bool) -> None:
    """Write the run folder `plan_restore` decided on (rank 0 only); Ray's checkpoint is the truth."""
    from chexdist.training.checkpoint import list_checkpoints

    if run.exists():
        shutil.rmtree(run)
    if resume:
        shutil.copytree(checkpoint_dir, run)
        from chexdist.config import save_config

        save_config(config, run / "config.yaml")
        return
    run.mkdir(parents=True)
    shutil.copy2(list_checkpoints(checkpoint_dir)[-1] / "model.safetensors", run / INIT_WEIGHTS)


def _fit_trial(config: Config, overrides: dict[str, Any], run: Path, checkpoint, report_to, accelerator=None,
               is_main: bool = True, barrier=None) -> None:
    """Restore from `checkpoint` (if any), then run the engine, reporting every epoch to Ray."""
    from ray.tune import Checkpoint

    from chexdist.training.engine import fit

    check_shards_visible(config.data.shards)
    resume, offset = False, 0
    if checkpoint is not None:
        total = config.train.epochs
        with checkpoint.as_directory() as d:
            config, resume, offset = plan_restore(Path(d), run, config, overrides)
            if not resume and offset >= total:
                return  # PBT cloned a donor that had finished: the trial is that clone, nothing to train
            if is_main:
                materialize_restore(Path(d), run, config, resume)
        if barrier is not None:
            barrier()
    elif (found := _left_behind(run, config, overrides)) is not None:
        config, resume, offset = found
    elif is_main and run.exists():
        from chexdist.training.checkpoint import list_checkpoints

        if list_checkpoints(run):  # not this trial's (other parameters): keep it aside, never delete a checkpoint
            run.rename(run.with_name(f"{run.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
        else:
            shutil.rmtree(run)  # a start that died before its first checkpoint
    if barrier is not None:
        barrier()
    state = {"params": overrides, "epoch_offset": offset}

    def report(record: dict[str, Any]) -> None:
        metrics = _trial_metrics(record, offset)
        if is_main:
            append_jsonl(run.parent / HISTORY_FILE, metrics)
            with staged_checkpoint(run, state) as stage:
                report_to(metrics, checkpoint=Checkpoint.from_directory(str(stage)))
        else:
            report_to(metrics, checkpoint=None)

    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / STATE_FILE, dumps_json(state))
    fit(config, run, resume=resume or None, report=report, accelerator=accelerator, progress=False)


def _left_behind(run: Path, config: Config, overrides: dict[str, Any]) -> tuple[Config, bool, int] | None:
    """A trial Ray restarts without a checkpoint (the search was killed before Ray recorded one) finds
    its own run folder: continue it exactly from the engine's checkpoint instead of redoing epochs."""
    from chexdist.training.checkpoint import list_checkpoints

    if not (run / STATE_FILE).is_file() or not list_checkpoints(run):
        return None
    state = json.loads((run / STATE_FILE).read_text())
    if state["params"] != overrides:
        return None
    return _saved_config(run, config), True, state["epoch_offset"]


def _saved_config(folder: Path, config: Config) -> Config:
    """The config a run folder was trained with, reading the shards where this node sees them."""
    saved = config_from_dict(load_yaml(folder / "config.yaml", "trial config"))
    return apply_overrides(saved, {"data.shards": config.data.shards, "data.num_workers": config.data.num_workers})


def run_trial(sampled: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one trial, in this process or as a `workers`-process DDP job."""
    from ray import tune

    config, overrides = trial_config(setup, sampled)
    folder = _trial_folder(setup, tune.get_context().get_trial_dir())
    if setup.workers <= 1:
        _fit_trial(config, overrides, folder / RUN_DIR, tune.get_checkpoint(), tune.report)
        return
    _run_train_job(config, overrides, folder, setup)


# ---------------------------------------------------------------- multi-process trials (Ray Train)


def _run_train_job(config: Config, overrides: dict[str, Any], folder: Path, setup: TrialSetup) -> None:
    """Ray Train V2 way to nest DDP in Tune: this trial drives a TorchTrainer whose workers each run
    `engine.fit`; TuneReportCallback forwards rank 0's metrics to the trial. Train keeps its own
    checkpoints under the trial folder, so a restored trial re-runs the trainer and it continues."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config_to_dict(config), "overrides": overrides, "run": str(folder / RUN_DIR)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.workers,
            use_gpu=setup.gpus > 0,
            resources_per_worker={"CPU": setup.cpus, **({"GPU": setup.gpus} if setup.gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(folder),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    config = config_from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    _fit_trial(config, loop_config["overrides"], Path(loop_config["run"]), ray.train.get_checkpoint(), ray.train.report,
               accelerator=accelerator_for_ray_train(config), is_main=rank == 0, barrier=dist.barrier)


def accelerator_for_ray_train(config: Config):
    """An Accelerator on the process group Ray Train's TorchTrainer already set up. Ray exports
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and calls init_process_group (gloo on CPU); Accelerate
    reads the same variables and reuses an initialized group. On CPU it needs ACCELERATE_USE_CPU to
    take the multi-CPU path instead of looking for GPUs."""
    import torch

    from chexdist.utils.distributed import make_accelerator

    precision = config.train.precision if config.train.precision != "no" else None
    return make_accelerator(precision, cpu=not torch.cuda.is_available())

