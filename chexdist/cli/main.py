"""`chexdist` subcommands: thin wrappers over the library, one module per stage (prepare, training,
bench, tuning, evaluation), each registering its own subparsers. The only place that turns errors into
one-line messages and exit codes (2: bad input or configuration, or an optional extra not installed;
1: a check found problems, 75: stopped by SIGTERM/SIGUSR1 after saving a checkpoint, 130: Ctrl-C)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from chexdist import __version__
from chexdist.cli import app, bench, evaluation, export, prepare, training, tuning
from chexdist.errors import EXIT_INTERRUPTED, ChexdistError
from chexdist.training.launcher import process_group_released

DESCRIPTION = (
    "chexdist trains and evaluates multi-label chest X-ray classifiers (the 14 NIH ChestX-ray14 findings): "
    "pack an NIH-format download into WebDataset shards, then train on 1..N CPUs or GPUs with per-class "
    "validation AUROC/F1. "
    "Start with `chexdist demo`."
)

# Top-level package of an optional dependency -> the pyproject extra that installs it (scipy is in
# both [cam] and [bca]; `evaluate --ci bca` names the smaller one).
EXTRAS = {"ray": "tune", "optuna": "tune", "pytorch_grad_cam": "cam", "scipy": "cam", "fastapi": "app", "uvicorn": "app",
          "python_multipart": "app", "onnx": "export", "onnxruntime": "export", "onnxscript": "export"}

# In this order `chexdist --help` lists the commands.
REGISTER = (prepare.register, training.register, bench.register, tuning.register, training.register_demo,
            evaluation.register,
            app.register,
            export.register)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexdist", description=DESCRIPTION,
                                     epilog="Run `chexdist COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"chexdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return parser


def missing_extra(exc: ModuleNotFoundError, args: argparse.Namespace) -> str | None:
    """`<command> needs <package>: pip install 'chexdist[<extra>]'` when `exc` is an optional
    dependency that is not installed, else None."""
    package = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(package)
    if extra is None:
        return None
    if package == "scipy" and getattr(args, "ci", None) == "bca" and not getattr(args, "localize", None):
        extra = "bca"
    words = [args.command] + [getattr(args, k) for k in ("shards_command", "config_command", "suite") if getattr(args, k, None)]
    return f"{' '.join(words)} needs {package}: pip install 'chexdist[{extra}]'"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with process_group_released():
            return func(args)
    except ChexdistError as exc:
        print(f"chexdist: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (message := missing_extra(exc, args)) is None:
            raise
        print(f"chexdist: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chexdist: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
