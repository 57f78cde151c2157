"""Entry point: `accelerate launch chexdist/train.py --recipe R --shards S --out O [--set k=v ...] [--resume]`,
also `python -m chexdist.train` and (via `chexdist train`) without knowing accelerate's flags.

Exit codes: 0 done, 2 bad input/config (refused before training), 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (requeue and pass --resume), 130 stopped by Ctrl-C after saving one, 1 anything
else. Messages come from rank 0 alone, except an error only one rank met, which that rank reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # `accelerate launch chexdist/train.py` puts chexdist/ first: no top-level `data`, `models`, ...

from chexdist.config import Config, add_set_argument, load_config
from chexdist.errors import EXIT_BAD_INPUT, ChexdistError


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
    add_set_argument(group, help="override one config key (repeatable); see `chexdist config show`")
    group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint in --out, or the given folder; '--resume auto' "
                            "also starts fresh when --out has no checkpoint (requeued jobs); without "
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


def launch_rank() -> int:
    """This process's global rank as set by the launcher (torchrun, accelerate launch, chexdist train)."""
    return int(os.environ.get("RANK", "0"))


def training_function(config: Config, args: argparse.Namespace) -> int:
    from chexdist.errors import Preempted
    from chexdist.training.engine import fit

    try:
        result = fit(config, args.out, resume=args.resume, progress=not args.no_progress)
    except Preempted as exc:
        if launch_rank() == 0:
            print(f"chexdist: {exc}", file=sys.stderr)
        return exc.exit_code
    if result.is_main_process:
        print(f"best val mean AUC {result.best_auc:.4f} at epoch {result.best_epoch}; run folder {result.out}")
    return 0


def _refuse(exc: ChexdistError, same_on_all_ranks: bool) -> int:
    rank = launch_rank()
    if rank == 0:
        print(f"chexdist: error: {exc}", file=sys.stderr)
    elif not same_on_all_ranks:
        print(f"chexdist: rank {rank}: error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    from chexdist.training.launcher import follow_launcher, process_group_released
    from chexdist.utils.stopsignals import hold_stop_signals

    with hold_stop_signals(), process_group_released():
        follow_launcher()
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chexdist").setLevel(logging.INFO)
    try:
        config = resolve_config(args)
    except ChexdistError as exc:  # from the command line and files alone: every rank sees the same
        return _refuse(exc, same_on_all_ranks=True)
    from chexdist.errors import SameOnAllRanks

    try:
        return training_function(config, args)
    except ChexdistError as exc:
        return _refuse(exc, same_on_all_ranks=isinstance(exc, SameOnAllRanks))


if __name__ == "__main__":
    sys.exit(main())
