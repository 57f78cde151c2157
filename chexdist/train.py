"""Entry point: `accelerate launch chexdist/train.py --recipe R --shards S --out O [--set k=v ...] [--resume]`,
also `python -m chexdist.train` and (via `chexdist train`) without knowing accelerate's flags.

Exit codes: 0 done, 2 bad input/config (refused before training), 75 preempted after saving a
checkpoint (requeue and pass --resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from chexdist.config import Config, load_config
from chexdist.errors import ChexdistError


TRAIN_DESCRIPTION = (
    "Train a multi-label chest X-ray classifier on packed shards into a run folder (config.yaml, "
    "metrics.jsonl, checkpoints/, best.safetensors, best.json)."
)
TRAIN_EPILOG = (
    "The config is resolved as defaults < --recipe < --config < --set. `chexdist config show --recipe R` "
    "lists every key with its value and allowed values (README, 'Configuration'). Progress: a bar on a "
    "terminal; in a log file one line every train.log_every_s seconds and one line per epoch."
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments shared by train.py and `chexdist train`."""
    group = parser.add_argument_group("run")
    group.add_argument("--recipe", default=None, help="chexnet, dannynet, efficientnet, vit, tiny, or a YAML path")
    group.add_argument("--config", default=None, help="YAML file applied over the recipe (e.g. a run's config.yaml)")
    group.add_argument("--shards", default=None, help="shard folder (sets data.shards)")
    group.add_argument("--out", required=True, help="run folder, e.g. runs/dannynet")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key (repeatable); see `chexdist config show`")
    group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint in --out (or the given folder); without "
                            "--recipe/--config the run's own --out/config.yaml is used")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bar or timed progress lines (the per-epoch line is still printed)")


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config. `--resume` with neither --recipe nor --config continues the run in --out with
    its saved config.yaml; --set on top is still checked against the resumable keys by the engine."""
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.resume and not args.recipe and not args.config:
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise ChexdistError(
                f"{saved}: not found; --resume without --recipe/--config continues the run saved in --out "
                "(is --out the run folder?)"
            )
        return load_config(None, saved, overrides)
    return load_config(args.recipe, args.config, overrides)


def training_function(config: Config, args: argparse.Namespace) -> int:
    from chexdist.engine import EXIT_REQUEUE, Preempted, fit

    try:
        result = fit(config, args.out, resume=args.resume, progress=not args.no_progress)
    except Preempted as exc:
        print(f"chexdist: {exc}", file=sys.stderr)
        return EXIT_REQUEUE
    if result.is_main_process:
        print(f"best val mean AUC {result.best_auc:.4f} at epoch {result.best_epoch}; run folder {result.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a chest X-ray classifier (one process of a launch).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chexdist").setLevel(logging.INFO)
    try:
        return training_function(resolve_config(args), args)
    except ChexdistError as exc:
        print(f"chexdist: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
