"""`chexdist tune`: a Ray Tune search over loss, optimizer and augmentation."""

from __future__ import annotations

import argparse


def cmd_tune(args: argparse.Namespace) -> int:
    from chexdist.tuning.tuner import run_search

    return run_search(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `tune` to the `chexdist` subcommands."""
    from chexdist.tuning.tuner import add_tune_arguments

    p = sub.add_parser("tune", help="Ray Tune search over loss, optimizer, augmentation (each trial runs the engine)")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)
