"""`chexdist` subcommands: thin wrappers over the library. The only place that turns errors into
one-line messages and exit codes (2: bad input or configuration, 1: a check found problems)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from chexdist import __version__
from chexdist.errors import ChexdistError


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def cmd_synth(args: argparse.Namespace) -> int:
    from chexdist.synth import make_synthetic_nih

    summary = make_synthetic_nih(args.out, images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {summary['images']} images of {summary['patients']} patients to {args.out}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from chexdist.pack import PackSettings, merge_tasks, pack_dataset, pack_task

    settings = PackSettings(
        split=args.split,
        size=args.size,
        format=args.format,
        quality=args.quality,
        shard_size=args.shard_size,
        limit=args.limit,
        seed=args.seed,
        val_fraction=args.val_fraction,
        fractions=tuple(args.fractions),
        stratify=args.stratify,
    )
    if args.task_index is not None:
        if args.merge or args.num_tasks is None:
            raise ChexdistError("--task-index needs --num-tasks N and excludes --merge")
        record = pack_task(args.nih_root, args.out, settings, args.task_index, args.num_tasks,
                           workers=args.workers, progress=not args.quiet)
        print(f"task {args.task_index} of {args.num_tasks}: packed {len(record['shards'])} shard(s), "
              f"{record['samples']} samples, {record['errors']} skipped, into {args.out}; "
              "run --merge when every task is done")
        return 0
    if args.merge:
        manifest = merge_tasks(args.nih_root, args.out, settings, num_tasks=args.num_tasks)
    elif args.num_tasks is not None:
        raise ChexdistError("--num-tasks goes with --task-index I (one array task) or --merge")
    else:
        manifest = pack_dataset(args.nih_root, args.out, settings, workers=args.workers, progress=not args.quiet)
    counts = ", ".join(f"{s} {v['samples']} ({v['patients']} patients)" for s, v in manifest["splits"].items())
    print(f"packed {counts} into {args.out}")
    if manifest["errors"]:
        reasons = ", ".join(f"{n} {k}" for k, n in manifest["error_reasons"].items())
        print(f"skipped {manifest['errors']} input(s) ({reasons}); listed in {os.path.join(args.out, 'errors.jsonl')}")
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from chexdist.pack import verify_shards

    report = verify_shards(args.path, workers=args.workers)
    for problem in report["problems"]:
        print(f"FAIL {problem}")
    status = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"{status}: {report['shards']} shards, {report['samples']} samples verified in {args.path}")
    return 0 if report["ok"] else 1


def cmd_shards_info(args: argparse.Namespace) -> int:
    from chexdist.pack import format_info
    from chexdist.shardformat import load_manifest

    manifest = load_manifest(args.path)
    print(json.dumps(manifest, indent=2) if args.json else format_info(manifest))
    return 0


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
    """Train here (1 process) or in N local worker processes (`chexdist.launcher`), after the same
    `preflight` that `fit` runs, so bad input is refused once, before any worker starts."""
    if args.nproc < 1:
        raise ChexdistError(f"--nproc must be >= 1, got {args.nproc}")
    from chexdist.launcher import hold_stop_signals, run_workers

    with hold_stop_signals():  # a stop signal during the imports and checks still ends in a checkpoint
        import torch

        from chexdist.engine import preflight
        from chexdist.train import resolve_config, training_function

        config = resolve_config(args)
        if args.nproc == 1:
            return training_function(config, args)
        preflight(config, args.out, args.resume)
        return run_workers([sys.executable, "-m", "chexdist.train", *_train_argv(args)], args.nproc, cpu=not torch.cuda.is_available())


def cmd_train(args: argparse.Namespace) -> int:
    return run_training(args)


DEMO_MARKER = ".chexdist-demo"


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic NIH-format data -> shards -> 2-process CPU DDP training -> per-class val AUROC."""
    import shutil
    import time
    from pathlib import Path

    from chexdist.pack import PackSettings, pack_dataset
    from chexdist.synth import make_synthetic_nih
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
                 workers=min(2, _default_workers()), progress=False)
    print(f"[3/3] train: recipe tiny, {args.nproc} process(es)")
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
    metrics = info["val_metrics"]
    print(f"\n{'finding':20s}{'val AUROC':>10s}{'val F1':>8s}{'threshold':>11s}")
    for label, auc in metrics["val_auc"].items():
        print(f"{label:20s}{auc:10.3f}{metrics['val_f1'][label]:8.3f}{info['thresholds'][label]:11.3f}")
    print(f"{'mean':20s}{metrics['val_auc_mean']:10.3f}{metrics['val_f1_mean']:8.3f}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s: best epoch {info['epoch']}, "
          f"run folder {out / 'run'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from chexdist.bench import run_suite

    if args.suite == "loader":
        options = dict(images=args.images, count=args.count or 1024, workers=args.workers, batch_size=args.batch_size or 32,
                       repeats=args.repeats or 2, formats=tuple(args.formats.split(",")))
    elif args.suite == "pack":
        options = dict(images=args.images, count=args.count or 64, workers=args.workers, size=args.size, fmt=args.formats.split(",")[0])
    else:
        options = dict(model=args.model, image_size=args.image_size, batch_size=args.batch_size or 16, steps=args.steps,
                       precision=args.precision, repeats=args.repeats or 6)
    run_suite(args.suite, **options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexdist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"chexdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the exact NIH file layout")
    p.add_argument("out", help="output folder (becomes an --nih-root)")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pack", help="pack an NIH-format download into WebDataset shards")
    p.add_argument("--nih-root", required=True, help="folder with Data_Entry_2017*.csv[.gz] and images")
    p.add_argument("--out", required=True, help="shard folder, e.g. shards/nih")
    p.add_argument("--split", default="random", help="official (needs train_val_list.txt/test_list.txt) or random")
    p.add_argument("--size", type=int, default=512, help="shorter side in pixels; 0 keeps the original")
    p.add_argument("--format", default="png", help="png (lossless) or jpg (about 4x faster to decode)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decode processes")
    p.add_argument("--limit", type=int, default=None, help="pack at most N images (quick trials)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the in-split order")
    p.add_argument("--val-fraction", type=float, default=0.1, help="official: fraction of train_val patients for val")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                   help="random: patient fractions")
    p.add_argument("--stratify", action="store_true", help="random: stratify patients by their rarest finding")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--task-index", type=int, default=None, metavar="I",
                   help="array job: pack only shards i with i %% N == I (no manifest; see --merge)")
    p.add_argument("--num-tasks", type=int, default=None, metavar="N", help="array job: number of tasks")
    p.add_argument("--merge", action="store_true",
                   help="after all array tasks: verify their shards and write manifest.json + errors.jsonl")
    p.set_defaults(func=cmd_pack)

    shards = sub.add_parser("shards", help="inspect or verify packed shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("verify", help="re-check checksums, counts, decoding, labels and patient leakage")
    p.add_argument("path")
    p.add_argument("--workers", type=int, default=_default_workers())
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("info", help="table of splits, patients and prevalence")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_shards_info)

    from chexdist.train import add_train_arguments

    p = sub.add_parser("train", help="train (N local processes without knowing accelerate's flags)")
    add_train_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (GPUs, or CPU processes)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="performance suites; one JSON line per result, ratios measured in one run")
    p.add_argument("suite", choices=("loader", "pack", "train"))
    p.add_argument("--images", help="loader/pack: folder of real PNGs (cycled to --count)")
    p.add_argument("--count", type=int, default=0, help="images to use (loader 1024, pack 64)")
    p.add_argument("--workers", type=int, default=2, help="loader: DataLoader workers; pack: processes vs 1")
    p.add_argument("--batch-size", type=int, default=0, help="loader 32, train 16")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (loader 2, train 6)")
    p.add_argument("--formats", default="png,jpg", help="loader: shard formats; pack: the first one")
    p.add_argument("--size", type=int, default=512, help="pack: shorter side of packed images")
    p.add_argument("--model", default="resnet18", help="train: model name")
    p.add_argument("--image-size", type=int, default=128, help="train: input side")
    p.add_argument("--steps", type=int, default=20, help="train: optimizer steps per timed run")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="train: autocast dtype")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="synthetic data -> shards -> 2-process DDP training -> per-class AUROC")
    p.add_argument("--out", default="chexdist-demo", help="demo folder (replaced if an earlier demo made it)")
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ChexdistError as exc:
        print(f"chexdist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chexdist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
