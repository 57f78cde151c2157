"""Training commands: `chexdist train`, `chexdist demo`, `chexdist config show`."""

from __future__ import annotations

import argparse
import json
import sys

from chexdist.cli.prepare import default_workers
from chexdist.config import add_set_argument
from chexdist.errors import ChexdistError

DEMO_MARKER = ".chexdist-demo"


def _train_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--out", str(args.out)]
    for flag in ("recipe", "config", "shards"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    for override in args.overrides:
        argv += ["--set", override]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def run_training(args: argparse.Namespace) -> int:
    """Train here (1 process) or in N local worker processes (`chexdist.training.launcher`), after the same
    `preflight` that `fit` runs, so bad input is refused once, before any worker starts."""
    if args.nproc < 1:
        raise ChexdistError(f"--nproc must be >= 1, got {args.nproc}")
    from chexdist.training.launcher import run_workers
    from chexdist.utils.stopsignals import hold_stop_signals

    with hold_stop_signals():  # a stop signal during the imports and checks still ends in a checkpoint
        import torch

        from chexdist.training.preflight import preflight
        from chexdist.train import resolve_config, training_function

        config = resolve_config(args)
        if args.nproc == 1:
            return training_function(config, args)
        preflight(config, args.out, args.resume)
        return run_workers([sys.executable, "-m", "chexdist.train", *_train_argv(args)], args.nproc, cpu=not torch.cuda.is_available())


def cmd_train(args: argparse.Namespace) -> int:
    return run_training(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic NIH-format data -> shards -> 2-process CPU DDP training -> per-class val AUROC."""
    import shutil
    import time
    from pathlib import Path

    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih
    from chexdist.train import add_train_arguments

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise ChexdistError(f"{out}: exists and is not an earlier demo's folder; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by chexdist demo; safe to delete\n")
    started = time.perf_counter()
    print(f"[1/3] synth: {args.images} NIH-format images -> {out / 'nih'}")
    make_synthetic_nih(out / "nih", images=args.images, size=96, seed=args.seed)
    print(f"[2/3] pack: {out / 'shards'}")
    pack_dataset(out / "nih", out / "shards", PackSettings(split="official", size=72, shard_size=128),
                 workers=min(2, default_workers()), progress=False)
    print(f"[3/3] train: recipe tiny, {args.nproc} process{'es' if args.nproc != 1 else ''}")
    train_parser = argparse.ArgumentParser()
    add_train_arguments(train_parser)
    train_args = train_parser.parse_args(
        ["--recipe", "tiny", "--shards", str(out / "shards"), "--out", str(out / "run"), "--no-progress",
         "--set", f"train.epochs={args.epochs}"]
    )
    train_args.nproc = args.nproc
    code = run_training(train_args)
    if code:
        return code
    info = json.loads((out / "run" / "best.json").read_text())
    _print_demo_table(info)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s: best epoch {info['epoch']}, "
          f"run folder {out / 'run'}")
    print(f"next: look at its predictions in your browser (needs the [app] extra):\n  chexdist app --run {out / 'run'}")
    return 0


def _print_demo_table(info: dict) -> None:
    """Per-finding val AUROC, F1 and threshold of the demo's best epoch."""
    metrics = info["val_metrics"]

    def cell(value: float | None, width: int) -> str:  # null = not scorable in val (strict JSON)
        return f"{value:{width}.3f}" if value is not None else f"{'n/a':>{width}s}"

    print(f"\n{'finding':20s}{'val AUROC':>10s}{'val F1':>8s}{'threshold':>11s}")
    for label, auc in metrics["val_auc"].items():
        print(f"{label:20s}{cell(auc, 10)}{cell(metrics['val_f1'][label], 8)}{cell(info['thresholds'][label], 11)}")
    print(f"{'mean':20s}{cell(metrics['val_auc_mean'], 10)}{cell(metrics['val_f1_mean'], 8)}")


def cmd_config_show(args: argparse.Namespace) -> int:
    from chexdist.config import describe_config, dump_config, eval_crop_warning, load_config

    cfg = load_config(args.recipe, args.config, args.overrides)
    if args.yaml:
        print(dump_config(cfg), end="")
        return 0
    rows = describe_config(cfg)
    width = max(len(key) for key, _, _ in rows)
    value_width = min(24, max(len(value) for _, value, _ in rows))
    print(f"# recipe {cfg.recipe or '(none: defaults)'}; set keys with --set SECTION.KEY=VALUE")
    for key, value, allowed in rows:
        print(f"{key:{width}s}  {value:{value_width}s}  {allowed}")
    if warning := eval_crop_warning(cfg):
        print(f"# warning: {warning}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `config` to the `chexdist` subcommands (`demo` is `register_demo`, listed later)."""
    from chexdist.train import TRAIN_DESCRIPTION, TRAIN_EPILOG, add_train_arguments

    p = sub.add_parser("train", help="train a classifier (N local processes without knowing accelerate's flags)",
                       description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG)
    add_train_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (GPUs, or CPU processes)")
    p.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="show the resolved config: every key, its value and allowed values")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="every config key with its resolved value and allowed values",
                              description="Print every config key with its resolved value and its allowed values "
                                          "or range, for a recipe, a config file and --set overrides.")
    p.add_argument("--recipe", default=None, help="recipe name or YAML path (default: the dataclass defaults)")
    p.add_argument("--config", default=None, help="YAML file applied over the recipe (e.g. a run's config.yaml)")
    add_set_argument(p, help="override one key (repeatable)")
    p.add_argument("--yaml", action="store_true", help="print the config as YAML (a file for --config)")
    p.set_defaults(func=cmd_config_show)


def register_demo(sub: argparse._SubParsersAction) -> None:
    """Add `demo` to the `chexdist` subcommands."""
    p = sub.add_parser("demo", help="synthetic data -> shards -> 2-process DDP training -> per-class AUROC")
    p.add_argument("--out", default="chexdist-demo", help="demo folder (replaced if an earlier demo made it)")
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
