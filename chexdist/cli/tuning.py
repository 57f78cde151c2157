"""`chexdist tune` (and `python tune/search.py`): the flags, the `TuneOptions` they make, and the
summary printed after a search; the search itself is `chexdist.tuning.tuner.run_search`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from chexdist.config import add_set_argument

TUNE_HELP = "Ray Tune search over loss, optimizer, augmentation (each trial runs the engine)"


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `chexdist tune` and `python tune/search.py` (documented in the README)."""
    g = parser.add_argument_group("search")
    g.add_argument("--space", default="default", help="search space YAML, or a shipped space: default, tiny (tune/spaces/)")
    g.add_argument("--recipe", default="dannynet", help="recipe every trial starts from (name or YAML path)")
    g.add_argument("--config", default=None, help="YAML file applied over the recipe")
    g.add_argument("--shards", required=True, help="shard folder or URL every Ray node can read (sets data.shards)")
    add_set_argument(g, help="fix a config key for every trial (repeatable)")
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


def tune_options(args: argparse.Namespace):
    """The `TuneOptions` of parsed `chexdist tune` flags."""
    from chexdist.tuning.options import TuneOptions

    given = {f.name: getattr(args, f.name) for f in fields(TuneOptions) if f.name != "reuse_actors"}
    return TuneOptions(**given, reuse_actors=not args.no_reuse_actors)


def cmd_tune(args: argparse.Namespace) -> int:
    """Run the search and print its top trials; 0 when a trial reported a result (best.yaml written)."""
    from chexdist.tuning.tuner import require, run_search

    require("ray", "chexdist tune")
    summary = run_search(tune_options(args))
    print(summary["table"])
    print(f"\n{summary['trials']} trial(s), {summary['errors']} failed; results in {summary['experiment_dir']}")
    if summary["unfinished"]:
        print(f"{summary['unfinished']} trial(s) did not finish (the search was stopped, or --time-budget ran out); "
              "the same command with --resume continues them")
    if summary["best_recipe"]:
        print(f"best config: {summary['best_recipe']} (train it: chexdist train --recipe {summary['best_recipe']} --out runs/best)")
    return 0 if summary["best_recipe"] else 1


def register(sub) -> None:
    """Add the `tune` command to the `chexdist` subparsers `sub`."""
    p = sub.add_parser("tune", help=TUNE_HELP)
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)


def main(argv: Sequence[str] | None = None) -> int:
    """`python tune/search.py ...`: the same as `chexdist tune ...`."""
    from chexdist.cli.main import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])
