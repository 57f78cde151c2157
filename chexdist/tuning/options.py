"""The typed inputs of a search: `TuneOptions` (what a caller asks for; the CLI builds it from its
flags, the benchmark directly) and `SearchPlan` (what `plan_search` decided and checked from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chexdist.config import Config
from chexdist.tuning.space import SearchSpace

METRIC = "val_auc_mean"  # the search maximizes it


@dataclass
class TuneOptions:
    """Every option of a search; the defaults are `chexdist tune`'s (see its --help for each)."""

    shards: str  # shard folder or URL every Ray node can read (sets data.shards)
    space: str = "default"  # space YAML path, or a shipped space name
    recipe: str = "dannynet"
    config: str | None = None  # YAML applied over the recipe
    overrides: list[str] = field(default_factory=list)  # SECTION.KEY=VALUE fixed for every trial
    trials: int = 8
    max_epochs: int | None = None  # per-trial epoch budget (train.epochs); None: the recipe's
    trial_time: float | None = None  # per-trial wall-time budget, seconds
    time_budget: float | None = None  # whole-search wall-time budget, seconds
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    grace_epochs: int = 1
    perturb_epochs: int = 2
    seed: int | None = None
    max_concurrent: int = 0  # 0: as many as resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 on a machine with a GPU, else 0
    workers_per_trial: int = 1
    address: str | None = None  # a running Ray cluster; None: start a local one
    storage: str = "tune-results"
    name: str | None = None  # None: tune-<recipe>-<time>
    resume: bool = False
    max_failures: int = 2
    reuse_actors: bool = True


@dataclass
class SearchPlan:
    """Everything decided and checked before Ray starts."""

    config: Config
    space: SearchSpace
    experiment_dir: str
    name: str
    gpus: float
    pbt_keys: list[str]
