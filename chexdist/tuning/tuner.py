"""Ray Tune search: every trial runs `chexdist.training.engine.fit`, the one training loop.

`plan_search` refuses bad input before Ray starts; `build_tuner` makes the Tuner (searcher, scheduler,
budgets, failure retries, `Tuner.restore` for a resume); `run_search` runs it and writes the outputs
(`chexdist.tuning.results`). The pieces: space (the YAML), trial (one trial), results, restore.
All take a `TuneOptions`; printing is the caller's (`chexdist.cli.tuning`).

Ray is imported inside functions only: the engine never imports Ray, and `chexdist` works without
the [tune] extra until a search is started.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from chexdist.config import Config, apply_overrides, config_to_dict, load_config
from chexdist.data.shardformat import is_remote
from chexdist.errors import ChexdistError
from chexdist.tuning.options import METRIC, SearchPlan, TuneOptions
from chexdist.tuning.space import load_space, space_path
from chexdist.tuning.trial import TrialSetup, check_shards_visible, run_trial

PBT_KEYS = ("optim.lr", "aug.brightness", "aug.contrast", "aug.scale_min", "aug.degrees", "aug.translate")
# A multi-process trial only drives its TorchTrainer, whose workers hold the CPUs/GPUs; Ray needs a
# non-empty request, so the driver asks for a token of memory instead of a CPU the workers then lack.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20}


def require(module: str, what: str) -> None:
    """One line naming the extra to install when `module` (ray, optuna) is missing."""
    if importlib.util.find_spec(module) is None:
        raise ChexdistError(f"{what} needs {module}; install the tune extra: pip install 'chexdist[tune]'")


def plan_search(options: TuneOptions) -> SearchPlan:
    """Refuse bad input (config, space, flags, shards, missing extras) before Ray starts."""
    overrides = [*options.overrides, f"data.shards={options.shards}"]
    if options.max_epochs is not None:
        overrides.append(f"train.epochs={options.max_epochs}")
    config = absolute_paths(load_config(options.recipe, options.config, overrides))
    space = load_space(space_path(options.space), config)
    for flag, value, low in (("--trials", options.trials, 1), ("--workers-per-trial", options.workers_per_trial, 1),
                             ("--grace-epochs", options.grace_epochs, 1), ("--perturb-epochs", options.perturb_epochs, 1),
                             ("--max-failures", options.max_failures, 0), ("--max-concurrent", options.max_concurrent, 0)):
        if value < low:
            raise ChexdistError(f"{flag} {value}: must be >= {low}")
    if options.address is None:
        check_shards_visible(config.data.shards)
        from chexdist.data.shardformat import load_manifest

        load_manifest(config.data.shards)
    if options.search == "optuna":
        require("optuna", "--search optuna")
        grid = [k for k, p in space.params.items() if p.sampler == "grid"]
        if grid:
            raise ChexdistError(f"search space {space.path}: {grid[0]}: grid is not supported by --search optuna; use choice")
    pbt_keys = [k for k in PBT_KEYS if k in space.params and space.params[k].values is None]
    if options.scheduler == "pbt":
        if not pbt_keys:
            raise ChexdistError(f"--scheduler pbt: search space {space.path} samples none of {', '.join(PBT_KEYS)} from a range")
        if options.workers_per_trial > 1:
            raise ChexdistError("--scheduler pbt needs Tune-owned trial checkpoints; use it with --workers-per-trial 1")
    require("ray", "a search")
    storage = options.storage if is_remote(options.storage) else str(Path(options.storage).resolve())
    name = options.name or f"tune-{Path(config.recipe or 'run').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_dir = f"{storage.rstrip('/')}/{name}"
    if options.resume and not is_remote(storage) and not Path(experiment_dir).is_dir():
        raise ChexdistError(f"--resume: no experiment at {experiment_dir}; check --storage and --name")
    if not options.resume and not is_remote(storage) and Path(experiment_dir).exists():
        raise ChexdistError(f"{experiment_dir}: experiment exists; pass --resume to continue it or choose another --name")
    gpus = options.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return SearchPlan(config, space, experiment_dir, name, gpus, pbt_keys)


def absolute_paths(config: Config) -> Config:
    """Ray runs trials in their own working folders (and on other nodes): local paths must be absolute."""
    paths = {"data.shards": config.data.shards, "model.pretrained": config.model.pretrained}
    return apply_overrides(config, {k: os.path.abspath(v) for k, v in paths.items() if v and not is_remote(v)})


def searcher(options: TuneOptions, plan: SearchPlan, limit: int | None):
    """Random search limits concurrency itself (Tune ignores max_concurrent_trials for it); Optuna is
    wrapped in a ConcurrencyLimiter."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(seed=options.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=limit) if limit else optuna
    return BasicVariantGenerator(random_state=options.seed, max_concurrent=limit or 0)


def scheduler(options: TuneOptions, plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if options.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan.config.train.epochs,
                             grace_period=min(options.grace_epochs, plan.config.train.epochs), reduction_factor=2)
    if options.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=options.perturb_epochs,
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


def build_tuner(options: TuneOptions, plan: SearchPlan):
    """The Tuner of a planned search (Ray must be running), or the restored one with --resume."""
    from ray import tune

    from chexdist.tuning.restore import RestoreFromNextCheckpoint

    setup = TrialSetup(config_to_dict(plan.config), plan.space, plan.experiment_dir, options.workers_per_trial,
                       options.cpus_per_trial, plan.gpus, options.max_failures)
    trainable = tune.with_parameters(run_trial, setup=setup)
    if options.workers_per_trial > 1:
        trainable = tune.with_resources(trainable, DRIVER_RESOURCES)
    else:
        trainable = tune.with_resources(trainable, {"cpu": options.cpus_per_trial, "gpu": plan.gpus})
    if options.resume:
        return tune.Tuner.restore(plan.experiment_dir, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=plan.space.ray_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=options.trials,
            search_alg=searcher(options, plan, options.max_concurrent or concurrency(options, plan)),
            scheduler=scheduler(options, plan),
            time_budget_s=options.time_budget,
            reuse_actors=options.reuse_actors and options.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.experiment_dir.rsplit("/", 1)[0],
            stop={"time_total_s": options.trial_time} if options.trial_time else None,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            # PBT clones other trials' checkpoints; Ray's pruning then deletes ones still in use
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if options.scheduler == "pbt" else 1),
            callbacks=[RestoreFromNextCheckpoint()],
            progress_reporter=_reporter(plan),
            verbose=1,
        ),
    )


def _reporter(plan: SearchPlan):
    from ray.tune import CLIReporter

    return CLIReporter(metric_columns=["epoch", "val_loss", METRIC, "val_f1_mean", "val_ap_mean"],
                       parameter_columns=list(plan.space.params), max_report_frequency=30)


def concurrency(options: TuneOptions, plan: SearchPlan) -> int | None:
    """Multi-process trials hold no CPU themselves, so cap how many start to what the cluster fits."""
    if options.workers_per_trial <= 1:
        return None
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // (options.workers_per_trial * options.cpus_per_trial)))


def run_search(options: TuneOptions) -> dict[str, Any]:
    """Plan (refusing bad input), start/join Ray, run or restore the Tuner, write the outputs; the
    summary of `chexdist.tuning.results.write_outputs` plus the experiment folder."""
    plan = plan_search(options)
    import ray

    from chexdist.tuning.results import write_outputs

    ray_init(options.address)
    try:
        grid = build_tuner(options, plan).fit()
        summary = write_outputs(grid, plan)
    finally:
        ray.shutdown()
    return {**summary, "experiment_dir": plan.experiment_dir}
