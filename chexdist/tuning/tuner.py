"""Ray Tune hyperparameter search: every trial runs `chexdist.training.engine.fit`, the one training loop.

Pieces, in order of use: the search-space YAML (`load_space`, checked against the config before Ray
starts), the trial (`run_trial`: one process, or a Ray Train `TorchTrainer` DDP job per trial with
`workers_per_trial > 1`), the Tuner (`run_search`: searcher, scheduler, budgets, failure retries,
`Tuner.restore` for --resume) and the outputs (results.csv, PNGs, best.yaml, top-5 table).

Ray is imported inside functions only: the engine never imports Ray, and `chexdist` works without
the [tune] extra until a search is started.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chexdist.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_keys,
    config_to_dict,
    dump_config,
    load_config,
    load_yaml,
)
from chexdist.errors import ChexdistError
from chexdist.utils.fileio import append_jsonl, atomic_write_text, dumps_json

log = logging.getLogger("chexdist")

METRIC = "val_auc_mean"
# tune/spaces/ of a checkout, then where `pip install` puts them (pyproject data-files)
SPACES_DIRS = (Path(__file__).resolve().parents[2] / "tune" / "spaces", Path(sys.prefix) / "share" / "chexdist" / "tune" / "spaces")
RUN_DIR = "run"  # the trial's chexdist run folder, inside its trial folder
HISTORY_FILE = "epochs.jsonl"  # in the trial folder: every epoch the trial reported (our record, not Ray's)
STATE_FILE = "tune_state.json"  # in a trial checkpoint: the trial's parameters and epoch offset
INIT_WEIGHTS = "pbt-init.safetensors"  # donor weights a PBT-exploited trial starts from
PBT_KEYS = ("optim.lr", "aug.brightness", "aug.contrast", "aug.scale_min", "aug.degrees", "aug.translate")
# A multi-process trial only drives its TorchTrainer, whose workers hold the CPUs/GPUs; Ray needs a
# non-empty request, so the driver asks for a token of memory instead of a CPU the workers then lack.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20}
OWNED_KEYS = {"data.shards": "--shards", "train.epochs": "--max-epochs"}


# ------------------------------------------------------------------------------------ search space

# sampler name -> (argument form shown in errors, number of arguments or None for a list of values)
SAMPLERS: dict[str, tuple[str, int | None]] = {
    "choice": ("[a, b, ...]", None),
    "grid": ("[a, b, ...]", None),
    "uniform": ("[low, high]", 2),
    "quniform": ("[low, high, q]", 3),
    "loguniform": ("[low, high]", 2),
    "qloguniform": ("[low, high, q]", 3),
    "randint": ("[low, high)", 2),
    "qrandint": ("[low, high, q]", 3),
    "lograndint": ("[low, high)", 2),
}


@dataclass
class Param:
    """One searched config key: a Ray sampler and the condition under which it applies."""

    key: str
    sampler: str
    args: list[Any]
    when: dict[str, list[Any]] = field(default_factory=dict)

    def domain(self):
        from ray import tune

        if self.sampler in ("choice", "grid"):
            return (tune.grid_search if self.sampler == "grid" else tune.choice)(list(self.args))
        return getattr(tune, self.sampler)(*self.args)

    @property
    def values(self) -> list[Any] | None:
        return list(self.args) if self.sampler in ("choice", "grid") else None


@dataclass
class SearchSpace:
    path: str
    params: dict[str, Param]
    fixed: dict[str, Any]

    def ray_space(self) -> dict[str, Any]:
        return {key: p.domain() for key, p in self.params.items()}

    def active(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides of one trial: fixed values plus sampled values whose `when` holds."""
        chosen = dict(self.fixed)
        for key, p in self.params.items():
            if key in sampled and all(sampled.get(k) in allowed for k, allowed in p.when.items()):
                chosen[key] = sampled[key]
        return chosen


def space_path(space: str) -> Path:
    """A space YAML path, or the name of a shipped space (default, tiny)."""
    if Path(space).is_file() or space.endswith((".yaml", ".yml")) or "/" in space:
        return Path(space)
    for folder in SPACES_DIRS:
        if (folder / f"{space}.yaml").is_file():
            return folder / f"{space}.yaml"
    shipped = sorted({p.stem for folder in SPACES_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ChexdistError(f"--space {space}: no such file or shipped space; shipped: {', '.join(shipped) or 'none found'}")


def load_space(path: str | os.PathLike, base: Config) -> SearchSpace:
    """Read a space YAML and check every key, sampler, bound and condition against `base` (the
    config every trial starts from); errors are one line naming the file and the key."""
    where = str(path)
    data = load_yaml(path, "search space")
    if not isinstance(data, Mapping) or not data:
        raise ChexdistError(f"search space {where}: expected a mapping of config keys (e.g. 'optim.lr: {{loguniform: [1.0e-5, 1.0e-2]}}')")
    known = config_keys()
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for key, spec in data.items():
        key = str(key)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ChexdistError(f"search space {where}: unknown config key {key!r}{hint}; see `chexdist tune --help` and the README")
        if key in OWNED_KEYS:
            raise ChexdistError(f"search space {where}: {key!r} is set by {OWNED_KEYS[key]}, not searched")
        if not isinstance(spec, Mapping):
            _check_value(where, base, key, spec)
            fixed[key] = spec
            continue
        params[key] = _parse_param(where, base, key, spec)
    for p in params.values():
        for other, allowed in p.when.items():
            cond = params.get(other)
            if cond is None or cond.values is None:
                raise ChexdistError(
                    f"search space {where}: {p.key}: 'when' names {other!r}, which must be a searched key with choice/grid values"
                )
            bad = [v for v in allowed if v not in cond.values]
            if bad:
                raise ChexdistError(f"search space {where}: {p.key}: when {other} = {bad[0]!r}, but {other} is one of {cond.values}")
    if not params:
        raise ChexdistError(f"search space {where}: nothing is searched; give at least one key a sampler such as {{choice: [...]}}")
    return SearchSpace(where, params, fixed)


def _parse_param(where: str, base: Config, key: str, spec: Mapping) -> Param:
    when = spec.get("when") or {}
    samplers = [k for k in spec if k != "when"]
    if len(samplers) != 1 or samplers[0] not in SAMPLERS:
        name = samplers[0] if samplers else "nothing"
        close = difflib.get_close_matches(str(name), list(SAMPLERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ChexdistError(
            f"search space {where}: {key}: expected one sampler ({', '.join(SAMPLERS)}) and optionally 'when', got {name!r}{hint}"
        )
    sampler = samplers[0]
    form, count = SAMPLERS[sampler]
    args = spec[sampler]
    if not isinstance(args, list) or (count is None and not args) or (count is not None and len(args) != count):
        raise ChexdistError(f"search space {where}: {key}: {sampler} takes {form}, got {args!r}")
    if count is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) or not args[0] < args[1]:
            raise ChexdistError(f"search space {where}: {key}: {sampler} takes numbers {form} with low < high, got {args!r}")
        if sampler.startswith(("log", "qlog")) and args[0] <= 0:
            raise ChexdistError(f"search space {where}: {key}: {sampler} needs low > 0, got {args[0]!r}")
        if "randint" in sampler and not all(isinstance(a, int) for a in args):
            raise ChexdistError(f"search space {where}: {key}: {sampler} takes integers {form}, got {args!r}")
        probes = args[:2]
    else:
        probes = args
    for value in probes:
        _check_value(where, base, key, value)
    if not isinstance(when, Mapping):
        raise ChexdistError(f"search space {where}: {key}: 'when' must map a key to its value(s), e.g. {{loss.name: focal}}")
    return Param(key, sampler, list(args), {str(k): list(v) if isinstance(v, list) else [v] for k, v in when.items()})


def _check_value(where: str, base: Config, key: str, value: Any) -> None:
    try:
        apply_overrides(base, {key: value})
    except ChexdistError as exc:
        raise ChexdistError(f"search space {where}: {exc}") from None


# ------------------------------------------------------------------------------------------ trials


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
    if "://" in shards or shards.startswith("pipe:"):
        return
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        raise ChexdistError(
            f"data.shards {shards}: not visible on node {socket.gethostname()}; every Ray node must see the "
            "shards at this path (shared filesystem) or read them by URL"
        )


def _trial_folder(setup: TrialSetup, local_trial_dir: str) -> Path:
    """The trial's folder in the experiment (local storage) or Ray's local trial folder (URL storage)."""
    if "://" in setup.experiment_dir:
        return Path(local_trial_dir)
    return Path(setup.experiment_dir) / Path(local_trial_dir).name


def _trial_metrics(record: dict[str, Any], epoch_offset: int) -> dict[str, Any]:
    """The engine's epoch record for Ray: epochs counted over the whole trial (PBT restarts included),
    NaN (a class without positives in val) as null so Ray's result.json stays strict JSON."""
    metrics = {k: _nan_to_none(v) for k, v in record.items() if k != "val_thresholds"}
    metrics["epoch"] = record["epoch"] + epoch_offset
    return metrics


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


@contextlib.contextmanager
def _staged_checkpoint(run: Path, state: dict[str, Any]) -> Iterator[Path]:
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
            with _staged_checkpoint(run, state) as stage:
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


# ------------------------------------------------------------------------------------------ search


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `chexdist tune` and `python tune/search.py` (documented in the README)."""
    g = parser.add_argument_group("search")
    g.add_argument("--space", default="default", help="search space YAML, or a shipped space: default, tiny (tune/spaces/)")
    g.add_argument("--recipe", default="dannynet", help="recipe every trial starts from (name or YAML path)")
    g.add_argument("--config", default=None, help="YAML file applied over the recipe")
    g.add_argument("--shards", required=True, help="shard folder or URL every Ray node can read (sets data.shards)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="fix a config key for every trial (repeatable)")
    g.add_argument("--trials", type=int, default=8, help="trials to sample (each grid point counts as one per sample)")
    g.add_argument("--max-epochs", type=int, default=None, help="per-trial epoch budget (sets train.epochs; default: the recipe's)")
    g.add_argument("--trial-time", type=float, default=None, metavar="S", help="per-trial wall-time budget in seconds")
    g.add_argument("--time-budget", type=float, default=None, metavar="S", help="whole-search wall-time budget in seconds")
    g.add_argument("--search", choices=("random", "optuna"), default="random", help="random (default) or optuna (TPE)")
    g.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha",
                   help="asha (early-stops bad trials on val_auc_mean), pbt (mutates lr and augmentation strength), fifo")
    g.add_argument("--grace-epochs", type=int, default=1, help="asha: epochs every trial runs before it may be stopped")
    g.add_argument("--perturb-epochs", type=int, default=2, help="pbt: epochs between exploit/explore steps")
    g.add_argument("--seed", type=int, default=None, help="seed of the searcher's sampling")
    g.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as many as resources allow)")
    r = parser.add_argument_group("resources and storage")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (per worker with --workers-per-trial)")
    r.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial (per worker); default 1 on a machine with a GPU, else 0")
    r.add_argument("--workers-per-trial", type=int, default=1, help="K > 1: each trial is a K-process DDP job (Ray Train TorchTrainer)")
    r.add_argument("--address", default=None, help="join a running Ray cluster (HOST:PORT or auto); default: start a local one")
    r.add_argument("--storage", default="tune-results", help="folder (or URL) holding experiments")
    r.add_argument("--name", default=None, help="experiment name (default: tune-<recipe>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the experiment --storage/--name (Tuner.restore)")
    r.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (FailureConfig)")
    r.add_argument("--no-reuse-actors", action="store_true", help="a fresh worker process per trial")


@dataclass
class SearchPlan:
    """Everything decided and checked before Ray starts."""

    config: Config
    space: SearchSpace
    experiment_dir: str
    name: str
    gpus: float
    pbt_keys: list[str]


def plan_search(args: argparse.Namespace) -> SearchPlan:
    """Refuse bad input (config, space, flags, shards, missing extras) before Ray starts."""
    overrides = [*args.overrides, f"data.shards={args.shards}"]
    if args.max_epochs is not None:
        overrides.append(f"train.epochs={args.max_epochs}")
    config = _absolute_paths(load_config(args.recipe, args.config, overrides))
    space = load_space(space_path(args.space), config)
    for flag, value, low in (("--trials", args.trials, 1), ("--workers-per-trial", args.workers_per_trial, 1),
                             ("--grace-epochs", args.grace_epochs, 1), ("--perturb-epochs", args.perturb_epochs, 1),
                             ("--max-failures", args.max_failures, 0), ("--max-concurrent", args.max_concurrent, 0)):
        if value < low:
            raise ChexdistError(f"{flag} {value}: must be >= {low}")
    if args.address is None:
        check_shards_visible(config.data.shards)
        from chexdist.data.shardformat import load_manifest

        load_manifest(config.data.shards)
    if args.search == "optuna":
        _require("optuna", "--search optuna")
        grid = [k for k, p in space.params.items() if p.sampler == "grid"]
        if grid:
            raise ChexdistError(f"search space {space.path}: {grid[0]}: grid is not supported by --search optuna; use choice")
    pbt_keys = [k for k in PBT_KEYS if k in space.params and space.params[k].values is None]
    if args.scheduler == "pbt":
        if not pbt_keys:
            raise ChexdistError(f"--scheduler pbt: search space {space.path} samples none of {', '.join(PBT_KEYS)} from a range")
        if args.workers_per_trial > 1:
            raise ChexdistError("--scheduler pbt needs Tune-owned trial checkpoints; use it with --workers-per-trial 1")
    _require("ray", "a search")
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    name = args.name or f"tune-{Path(config.recipe or 'run').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_dir = f"{storage.rstrip('/')}/{name}"
    if args.resume and "://" not in storage and not Path(experiment_dir).is_dir():
        raise ChexdistError(f"--resume: no experiment at {experiment_dir}; check --storage and --name")
    if not args.resume and "://" not in storage and Path(experiment_dir).exists():
        raise ChexdistError(f"{experiment_dir}: experiment exists; pass --resume to continue it or choose another --name")
    gpus = args.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return SearchPlan(config, space, experiment_dir, name, gpus, pbt_keys)


def _absolute_paths(config: Config) -> Config:
    """Ray runs trials in their own working folders (and on other nodes): local paths must be absolute."""
    paths = {"data.shards": config.data.shards, "model.pretrained": config.model.pretrained}
    return apply_overrides(config, {k: os.path.abspath(v) for k, v in paths.items() if v and "://" not in v and not v.startswith("pipe:")})


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ChexdistError(f"{what} needs {module}; install the tune extra: pip install 'chexdist[tune]'")


def _searcher(args: argparse.Namespace, plan: SearchPlan, limit: int | None):
    """Random search limits concurrency itself (Tune ignores max_concurrent_trials for it); Optuna is
    wrapped in a ConcurrencyLimiter."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if args.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=args.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher
    return BasicVariantGenerator(random_state=args.seed, max_concurrent=limit or 0)


def _scheduler(args: argparse.Namespace, plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if args.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan.config.train.epochs,
                             grace_period=min(args.grace_epochs, plan.config.train.epochs), reduction_factor=2)
    if args.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=args.perturb_epochs,
            hyperparam_mutations={k: plan.space.params[k].domain() for k in plan.pbt_keys},
            quantile_fraction=0.25,
            synch=True,  # every trial reaches the step before any is cloned: no "donor has no checkpoint yet" skips
        )
    return FIFOScheduler()


def ray_init(address: str | None, **kwargs: Any) -> None:
    """Start or join Ray without writing an auth token in ~/.ray (RAY_AUTH_MODE=disabled)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter: our compact columns, not every metric
    ray.init(address=address, include_dashboard=False, log_to_driver=True, **kwargs)


def run_search(args: argparse.Namespace) -> int:
    """`chexdist tune`: plan (refusing bad input), start/join Ray, run or restore the Tuner, write outputs."""
    plan = plan_search(args)
    import ray

    ray_init(args.address)
    try:
        grid = build_tuner(args, plan).fit()
        summary = write_outputs(grid, plan)
    finally:
        ray.shutdown()
    print(summary["table"])
    print(f"\n{summary['trials']} trial(s), {summary['errors']} failed; results in {plan.experiment_dir}")
    if summary["unfinished"]:
        print(f"{summary['unfinished']} trial(s) did not finish (the search was stopped, or --time-budget ran out); "
              "the same command with --resume continues them")
    if summary["best_recipe"]:
        print(f"best config: {summary['best_recipe']} (train it: chexdist train --recipe {summary['best_recipe']} --out runs/best)")
    return 0 if summary["best_recipe"] else 1


def build_tuner(args: argparse.Namespace, plan: SearchPlan):
    """The Tuner of a planned search (Ray must be running), or the restored one with --resume."""
    from ray import tune

    from chexdist.tuning.restore import RestoreFromNextCheckpoint

    setup = TrialSetup(config_to_dict(plan.config), plan.space, plan.experiment_dir, args.workers_per_trial,
                       args.cpus_per_trial, plan.gpus, args.max_failures)
    trainable = tune.with_parameters(run_trial, setup=setup)
    if args.workers_per_trial > 1:
        trainable = tune.with_resources(trainable, DRIVER_RESOURCES)
    else:
        trainable = tune.with_resources(trainable, {"cpu": args.cpus_per_trial, "gpu": plan.gpus})
    if args.resume:
        return tune.Tuner.restore(plan.experiment_dir, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=plan.space.ray_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=args.trials,
            search_alg=_searcher(args, plan, args.max_concurrent or _concurrency(args, plan)),
            scheduler=_scheduler(args, plan),
            time_budget_s=args.time_budget,
            reuse_actors=not args.no_reuse_actors and args.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.experiment_dir.rsplit("/", 1)[0],
            stop={"time_total_s": args.trial_time} if args.trial_time else None,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            # PBT clones other trials' checkpoints; Ray's pruning then deletes ones still in use
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if args.scheduler == "pbt" else 1),
            callbacks=[RestoreFromNextCheckpoint()],
            progress_reporter=_reporter(plan),
            verbose=1,
        ),
    )


def _reporter(plan: SearchPlan):
    from ray.tune import CLIReporter

    return CLIReporter(metric_columns=["epoch", "val_loss", METRIC, "val_f1_mean", "val_ap_mean"],
                       parameter_columns=list(plan.space.params), max_report_frequency=30)


def _concurrency(args: argparse.Namespace, plan: SearchPlan) -> int | None:
    """Multi-process trials hold no CPU themselves, so cap how many start to what the cluster fits."""
    if args.workers_per_trial <= 1:
        return None
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // (args.workers_per_trial * args.cpus_per_trial)))


# ----------------------------------------------------------------------------------------- outputs


def write_outputs(grid, plan: SearchPlan) -> dict[str, Any]:
    """results.csv, val_auc_per_epoch.png, params_vs_auc.png, best.yaml and the top-5 table."""
    import pandas as pd

    out = Path(plan.experiment_dir)
    rows, curves = [], {}
    statuses = _ray_statuses(plan.experiment_dir)
    for result in grid:
        params = result.config or _started_params(result.path)
        history = trial_history(result)
        trial_id = _trial_id(result)
        row: dict[str, Any] = {"trial": trial_id, "status": None}
        active = plan.space.active(params)
        for key in plan.space.params:
            row[key] = active.get(key)
        if history is not None and METRIC in history and history[METRIC].notna().any():
            curves[trial_id] = (history["epoch"].tolist(), history[METRIC].tolist())
            best = history.loc[history[METRIC].idxmax()]
            row.update(best_epoch=int(best["epoch"]), best_val_auc_mean=float(best[METRIC]),
                       best_val_f1_mean=float(best["val_f1_mean"]), best_val_ap_mean=float(best["val_ap_mean"]),
                       best_val_loss=float(best["val_loss"]), epochs=int(history["epoch"].max()),
                       wall_s=_wall_seconds(result))
        else:
            row.update(best_epoch=None, best_val_auc_mean=None, best_val_f1_mean=None, best_val_ap_mean=None,
                       best_val_loss=None, epochs=0, wall_s=None)
        row["status"] = _status(result, statuses.get(trial_id), row["epochs"], plan.config.train.epochs)
        row["error"] = _error_line(result.error)
        row["trial_dir"] = result.path
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("best_val_auc_mean", ascending=False, na_position="last").reset_index(drop=True)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    _plots(out, curves, table, plan)
    best_recipe = None
    ok = table.dropna(subset=["best_val_auc_mean"]) if len(table) else table
    if len(ok):
        top = ok.iloc[0]
        best_recipe = str(out / "best.yaml")
        write_best_recipe(out / "best.yaml", plan, grid, top)
    columns = ["trial", "status", "epochs", "best_val_auc_mean", "best_val_f1_mean", "best_val_ap_mean", *plan.space.params]
    text = ok.head(5)[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-") if len(ok) else "no trial reported a result"
    counts = table["status"].value_counts() if len(table) else {}
    return {"table": f"top {min(5, len(ok))} of {len(table)} trial(s) by {METRIC}:\n{text}", "trials": len(table),
            "errors": int(counts.get("ERROR", 0)), "unfinished": int(counts.get("UNFINISHED", 0)), "best_recipe": best_recipe}


def trial_history(result):
    """One row per epoch the trial reported (the last report of an epoch that was re-run after a
    restore). Read from the trial's own epochs.jsonl: Ray rewrites its result files when PBT pauses,
    clones or restores a trial. Ray's dataframe where the trial folder is not local (URL storage)."""
    import pandas as pd

    path = Path(result.path) / HISTORY_FILE
    if not path.is_file():
        return result.metrics_dataframe
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return pd.DataFrame([records[e] for e in sorted(records)])


def _started_params(trial_dir: str) -> dict[str, Any]:
    """A trial's parameters when Ray has no result for it (the search was stopped while the trial
    was starting): the `params.json` Ray writes at its start, if the folder is local."""
    path = Path(trial_dir) / "params.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _trial_id(result) -> str:
    """From the trial folder's name (`run_trial_<id>_<n>_...`): under PBT a trial's last result carries its donor's id."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)
    return found.group(1) if found else Path(result.path).name


def _wall_seconds(result) -> float | None:
    seconds = (result.metrics or {}).get("time_total_s")
    return round(float(seconds), 2) if seconds is not None else None


def _ray_statuses(experiment_dir: str) -> dict[str, str]:
    """Each trial's status in the experiment's final snapshot. Its last result's `done` flag would
    not do: a trial that finished before a `--resume` comes back without it."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(experiment_dir).trials}


def _status(result, ray_status: str | None, epochs: int, budget: int) -> str:
    """ERROR; UNFINISHED (pending or running when the search was stopped, or its --time-budget ran
    out); DONE (ran its epoch budget); or STOPPED (by ASHA/PBT, early stopping or --trial-time)."""
    if result.error is not None:
        return "ERROR"
    if ray_status not in (None, "TERMINATED", "ERROR"):
        return "UNFINISHED"
    return "DONE" if epochs >= budget else "STOPPED"


def _error_line(error) -> str | None:
    """The one-line cause of a failed trial (our ChexdistError message when it is one)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if "ChexdistError:" in line]
    line = ours[-1] if ours else (lines[-1] if lines else type(error).__name__)
    return line.split("ChexdistError:", 1)[-1].strip()


def write_best_recipe(path: Path, plan: SearchPlan, grid, top) -> None:
    """The best trial's full config as a recipe YAML (`chexdist train --recipe path/best.yaml`)."""
    params = next(r.config for r in grid if Path(r.path).name == Path(top["trial_dir"]).name)
    config = apply_overrides(plan.config, plan.space.active(params))
    config.recipe = ""
    header = (
        f"# Best trial {top['trial']} of Ray Tune experiment {plan.name}: val mean AUC {top['best_val_auc_mean']:.4f}, "
        f"F1 {top['best_val_f1_mean']:.4f} at epoch {int(top['best_epoch'])}.\n"
        f"# Search space {plan.space.path}; train.epochs is the search's per-trial budget: raise it for a full run.\n"
        f"# Train it: chexdist train --recipe {path} --out runs/best\n"
    )
    text = dump_config(config).replace("recipe: ''\n", "")
    atomic_write_text(path, header + text)
    load_config(str(path))  # what we write must load as a recipe


def _plots(out: Path, curves: dict[str, tuple[list, list]], table, plan: SearchPlan) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipped the PNG plots (pip install 'chexdist[plots]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial, (epochs, aucs) in sorted(curves.items()):
        ax.plot(epochs, aucs, marker="o", label=trial)
    ax.set(xlabel="epoch", ylabel="val mean AUROC", title=f"{plan.name}: val AUC per epoch")
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, out / "val_auc_per_epoch.png")
    keys = list(plan.space.params)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        sub = table[[key, "best_val_auc_mean"]].dropna() if len(table) else table
        if plan.space.params[key].values is not None:
            labels = [str(v) for v in plan.space.params[key].values]
            ax.scatter([labels.index(str(v)) for v in sub[key]], sub["best_val_auc_mean"])
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        else:
            ax.scatter(sub[key].astype(float), sub["best_val_auc_mean"])
            if plan.space.params[key].sampler.startswith(("log", "qlog")):
                ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best val AUC")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, out / "params_vs_auc.png")


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    temp = path.with_name(f".tmp-{path.name}")
    fig.savefig(temp, dpi=110)
    plt.close(fig)
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    """`python tune/search.py ...`: the same as `chexdist tune ...`."""
    from chexdist.cli.main import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])


# ------------------------------------------------------------------------------------------- bench


def tune_suite(shards: str | None = None, epochs: int = 2, max_batches: int = 20, **_: Any) -> Iterator[dict[str, Any]]:
    """`chexdist bench tune`: (1) trials vs `engine.fit` of the same config in this (warmed-up)
    process: two identical trials one after the other in one reused worker (the first pays the
    worker's start and imports, the second is the steady state); (2) a 2-worker TorchTrainer trial vs `chexdist train
    --nproc 2`. Ray start-up is timed apart and excluded. Ray's and the engine's console output go to
    stderr so stdout holds only the JSON lines."""
    import subprocess

    import ray

    from chexdist.cli.main import launch_command
    from chexdist.training.engine import fit

    with tempfile.TemporaryDirectory(prefix="chexdist-bench-tune-") as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp)
        shards = shards or _bench_shards(root)
        fixed = [f"train.epochs={epochs}", f"data.max_train_batches={max_batches}", "eval.bootstrap=0"]
        config = load_config("tiny", overrides=[f"data.shards={shards}", *fixed])
        space = root / "space.yaml"
        space.write_text(f"optim.lr: {{grid: [{config.optim.lr}, {config.optim.lr}]}}\n")  # the plain run's config, twice

        fit(apply_overrides(config, {"train.epochs": 1, "data.max_train_batches": 1}), root / "warmup", progress=False)
        started = time.perf_counter()  # warm like the second trial: imports and first calls are paid
        fit(config, root / "plain", progress=False)
        plain_s = time.perf_counter() - started

        started = time.perf_counter()
        ray_init(None)
        ray_start_s = time.perf_counter() - started
        try:
            one = _timed_search(root, space, shards, fixed, "one", workers=1)
            ddp = _timed_search(root, space.with_name("ddp.yaml"), shards, fixed, "ddp", workers=2, lr=config.optim.lr)
        finally:
            ray.shutdown()
        argv = ["--recipe", "tiny", "--shards", str(shards), "--out", str(root / "nproc2"), "--no-progress",
                *[a for s in fixed for a in ("--set", s)]]
        cmd, env = launch_command(2, argv, cpu=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        nproc_s = time.perf_counter() - started
        if done.returncode:
            raise ChexdistError(f"bench tune: chexdist train --nproc 2 failed: {done.stderr.strip().splitlines()[-1:]}")
        images, ddp_images = _run_images(root / "plain", config), _run_images(root / "nproc2", config)
        plain_loop_s, nproc_loop_s = _loop_seconds(root / "plain"), _loop_seconds(root / "nproc2")
    cold, warm = one["trial_s"]
    yield {"bench": "tune", "case": "trial_overhead", "epochs": epochs, "train_images": images, "plain_fit_s": round(plain_s, 2),
           "trial_warm_s": round(warm, 2), "trial_cold_s": round(cold, 2), "overhead_warm_s": round(warm - plain_s, 2),
           "overhead_cold_s": round(cold - plain_s, 2), "ratio": round(plain_s / warm, 3), "ratio_cold": round(plain_s / cold, 3),
           "tuner_fit_s": round(one["wall_s"], 2), "ray_start_s": round(ray_start_s, 2),
           "plain_loop_s": plain_loop_s, "trial_loop_s": one["loop_s"][-1]}
    (ddp_s,) = ddp["trial_s"]
    yield {"bench": "tune", "case": "ddp2_trial", "epochs": epochs, "workers": 2, "train_images": ddp_images,
           "trial_img_s": round(ddp_images / ddp_s, 2), "train_nproc2_img_s": round(ddp_images / nproc_s, 2),
           "ratio": round(nproc_s / ddp_s, 3), "trial_s": round(ddp_s, 2), "train_nproc2_s": round(nproc_s, 2),
           "trial_loop_s": ddp["loop_s"][-1], "train_nproc2_loop_s": nproc_loop_s}


def _bench_shards(root: Path) -> str:
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    make_synthetic_nih(root / "nih", images=600, size=96, seed=0)
    pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=72, shard_size=128), workers=1, progress=False)
    return str(root / "shards")


def _run_images(run: Path, config: Config) -> int:
    """Training images a finished run consumed: optimizer steps x batch x processes (no accumulation)."""
    from chexdist.runs import read_metrics

    last = read_metrics(run)[-1]
    return last["step"] * config.data.batch_size * config.train.grad_accum * last["world_size"]


def _timed_search(root: Path, space: Path, shards: str, fixed: list[str], name: str, workers: int,
                  lr: float | None = None) -> dict[str, Any]:
    """Run a search of `space` (one trial at a time); per trial its wall time inside Ray and loop time."""
    if lr is not None:
        space.write_text(f"optim.lr: {{choice: [{lr}]}}\n")
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    argv = ["--space", str(space), "--recipe", "tiny", "--shards", str(shards), "--storage", str(root / "tune"), "--name", name,
            "--trials", "1", "--scheduler", "fifo", "--max-concurrent", "1", "--workers-per-trial", str(workers),
            *[a for s in fixed for a in ("--set", s)]]
    args = parser.parse_args(argv)
    plan = plan_search(args)
    started = time.perf_counter()
    grid = build_tuner(args, plan).fit()
    wall = time.perf_counter() - started
    results = sorted(grid, key=lambda r: Path(r.path).name)
    for result in results:
        if result.error is not None:
            raise ChexdistError(f"bench tune: a {name} trial failed: {_error_line(result.error)}")
    return {"wall_s": wall, "trial_s": [_wall_seconds(r) for r in results],
            "loop_s": [_loop_seconds(Path(r.path) / RUN_DIR) for r in results]}


def _loop_seconds(run: Path) -> float:
    """Training-loop seconds summed over the run's epochs (metrics.jsonl `seconds`)."""
    from chexdist.runs import read_metrics

    return round(sum(r["seconds"] for r in read_metrics(run)), 3)
