"""`chexdist bench SUITE`: the performance suites of `chexdist.bench`, one JSON line per result."""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> int:
    from chexdist.bench.suites import run_suite

    if args.suite == "loader":
        options = dict(images=args.images, count=args.count or 1024, workers=args.workers, batch_size=args.batch_size or 32,
                       repeats=args.repeats or 2, formats=tuple(args.formats.split(",")), size=args.size)
    elif args.suite == "tune":
        options = dict(shards=args.shards, epochs=args.epochs, max_batches=args.steps)
    elif args.suite == "pack":
        options = dict(images=args.images, count=args.count or 64, workers=args.workers, size=args.size, fmt=args.formats.split(",")[0],
                       repeats=args.repeats or 3)
    elif args.suite == "resume":
        options = dict(images=args.images, count=args.count or 512, workers=args.workers, batch_size=args.batch_size or 32,
                       size=args.size, repeats=args.repeats or 2)
    elif args.suite == "app":
        options = dict(run=args.run, images=args.images, clients=args.clients, requests=args.requests,
                       memory_requests=args.memory_requests, count=args.count or 16, workers=args.app_workers)
    elif args.suite == "reads":
        options = dict(ranks=args.ranks, workers=args.workers, shards=args.num_shards, count=args.count or 1600)
    else:
        options = dict(model=args.model, image_size=args.image_size, batch_size=args.batch_size or 16, steps=args.steps,
                       precision=args.precision, repeats=args.repeats or 6,
                       switches=tuple(s for s in args.switches.split(",") if s and s != "none"))
    run_suite(args.suite, **options)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench` to the `chexdist` subcommands."""
    p = sub.add_parser("bench", help="performance suites; one JSON line per result, ratios measured in one run")
    p.add_argument("suite", choices=("loader", "pack", "train", "resume", "reads", "tune", "app"))
    p.add_argument("--images", help="loader/pack/resume/app: folder of real PNGs (cycled to --count)")
    p.add_argument("--count", type=int, default=0, help="images to use (loader 1024, pack 64, resume 512, reads 1600)")
    p.add_argument("--workers", type=int, default=2, help="loader/resume/reads: DataLoader workers per rank; pack: processes vs 1")
    p.add_argument("--ranks", type=int, default=8, help="reads: simulated ranks")
    p.add_argument("--num-shards", type=int, default=80, help="reads: train shards")
    p.add_argument("--batch-size", type=int, default=0, help="loader 32, train 16")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (loader 2, pack 3, train 6)")
    p.add_argument("--formats", default="png,jpg", help="loader: shard formats; pack: the first one")
    p.add_argument("--size", type=int, default=512, help="loader/pack/resume: shorter side of packed images")
    p.add_argument("--model", default="resnet18", help="train: model name")
    p.add_argument("--image-size", type=int, default=128, help="train: input side")
    p.add_argument("--steps", type=int, default=20, help="train: optimizer steps per timed run")
    p.add_argument("--switches", default="channels_last,grad_checkpointing,compile",
                   help="train: switches timed against the default loop in the same run (comma list, or none)")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="train: autocast dtype")
    p.add_argument("--shards", default=None, help="tune: shard folder (default: synthetic shards made for the run)")
    p.add_argument("--epochs", type=int, default=2, help="tune: epochs per run (--steps caps batches per epoch)")
    p.add_argument("--run", default=None, help="app: run folder the server loads")
    p.add_argument("--clients", type=int, default=32, help="app: concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="app: requests per client (predict and cam alternate)")
    p.add_argument("--memory-requests", type=int, default=500, help="app: requests between the two RSS readings")
    p.add_argument("--app-workers", type=int, default=1, help="app: the server's inference threads")
    p.set_defaults(func=cmd_bench)
