"""`chexdist` subcommands: thin wrappers over the library. The only place that turns errors into
one-line messages and exit codes (2: bad input or configuration, 1: a check found problems, 75: stopped
by SIGTERM/SIGUSR1 after saving a checkpoint, 130: Ctrl-C)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from chexdist import __version__
from chexdist.cli import tuning
from chexdist.config import add_set_argument
from chexdist.errors import EXIT_INTERRUPTED, ChexdistError
from chexdist.training.launcher import process_group_released

DESCRIPTION = (
    "chexdist trains and evaluates multi-label chest X-ray classifiers (the 14 NIH ChestX-ray14 findings): "
    "pack an NIH-format download into WebDataset shards, then train on 1..N CPUs or GPUs with per-class "
    "validation AUROC/F1. "
    "Start with `chexdist demo`."
)


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def cmd_synth(args: argparse.Namespace) -> int:
    from chexdist.data.synth import make_synthetic_nih

    summary = make_synthetic_nih(args.out, images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {summary['images']} images of {summary['patients']} patients to {args.out}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from chexdist.data.pack import PackSettings, merge_tasks, pack_dataset, pack_task, unscorable_splits

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
        only_present=args.only_present,
        train_list=args.train_list,
        val_list=args.val_list,
        test_list=args.test_list,
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
    missing = manifest["missing"]
    if missing["rows"]:
        rows = manifest["source"]["rows"]
        by_folder = dict(missing["by_folder"])
        outside = by_folder.pop("(no folder)", 0)
        where = [f"{n:,} within the file-name range of {folder}" for folder, n in by_folder.items()]
        where += [f"{outside:,} outside every image folder's range"] if outside else []
        print(f"{missing['rows']:,} of {rows:,} rows of {manifest['source']['csv']} ({missing['rows'] / rows:.1%}) "
              f"have no image file under {args.nih_root}: {'; '.join(where)}")
        if missing["in_errors"]:
            print("  they are listed in errors.jsonl; pass --only-present to pack only the rows that have files "
                  "(split over those rows) and count the rest instead of listing them")
    if manifest["errors"]:
        reasons = ", ".join(f"{n:,} {k}" for k, n in manifest["error_reasons"].items())
        print(f"skipped {manifest['errors']:,} input(s) ({reasons}); listed in {os.path.join(args.out, 'errors.jsonl')}")
    for split, reasons in unscorable_splits(manifest).items():
        samples = manifest["splits"][split]["samples"]
        examples = ", ".join(f"{label} ({why})" for label, why in list(reasons.items())[:3])
        print(f"chexdist: warning: the {split} split ({samples} image{'s' if samples != 1 else ''}) cannot score {len(reasons)} of "
              f"{len(manifest['labels'])} findings, e.g. {examples}; their AUROC is undefined there; pack more "
              "images (--split random --stratify keeps rare findings in every split)", file=sys.stderr)
    lists = manifest["split"].get("lists")
    if lists:
        d = lists["label_disagreements"]
        print(f"split lists: {lists['unlisted_rows']} CSV row(s) in no list (not packed); {d['rows']} of {d['checked']} "
              f"row(s) with list labels disagree with the CSV (CSV labels packed)"
              + (f", e.g. {', '.join(d['examples'][:3])}" if d["rows"] else ""))
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from chexdist.data.pack import verify_shards

    report = verify_shards(args.path, workers=args.workers)
    for problem in report["problems"]:
        print(f"FAIL {problem}")
    status = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"{status}: {report['shards']} shards, {report['samples']} samples verified in {args.path}")
    return 0 if report["ok"] else 1


def cmd_shards_info(args: argparse.Namespace) -> int:
    from chexdist.data.pack import format_info
    from chexdist.data.shardformat import load_manifest

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
    """Train here (1 process) or in N local worker processes (`chexdist.training.launcher`), after the same
    `preflight` that `fit` runs, so bad input is refused once, before any worker starts."""
    if args.nproc < 1:
        raise ChexdistError(f"--nproc must be >= 1, got {args.nproc}")
    from chexdist.training.launcher import hold_stop_signals, run_workers

    with hold_stop_signals():  # a stop signal during the imports and checks still ends in a checkpoint
        import torch

        from chexdist.training.engine import preflight
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
                 workers=min(2, _default_workers()), progress=False)
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
    metrics = info["val_metrics"]
    def cell(value: float | None, width: int) -> str:  # null = not scorable in val (strict JSON)
        return f"{value:{width}.3f}" if value is not None else f"{'n/a':>{width}s}"

    print(f"\n{'finding':20s}{'val AUROC':>10s}{'val F1':>8s}{'threshold':>11s}")
    for label, auc in metrics["val_auc"].items():
        print(f"{label:20s}{cell(auc, 10)}{cell(metrics['val_f1'][label], 8)}{cell(info['thresholds'][label], 11)}")
    print(f"{'mean':20s}{cell(metrics['val_auc_mean'], 10)}{cell(metrics['val_f1_mean'], 8)}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s: best epoch {info['epoch']}, "
          f"run folder {out / 'run'}")
    return 0


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


def cmd_bench(args: argparse.Namespace) -> int:
    from chexdist.bench.loader import run_suite

    if args.suite == "loader":
        options = dict(images=args.images, count=args.count or 1024, workers=args.workers, batch_size=args.batch_size or 32,
                       repeats=args.repeats or 2, formats=tuple(args.formats.split(",")))
    elif args.suite == "tune":
        options = dict(shards=args.shards, epochs=args.epochs, max_batches=args.steps)
    elif args.suite == "pack":
        options = dict(images=args.images, count=args.count or 64, workers=args.workers, size=args.size, fmt=args.formats.split(",")[0],
                       repeats=args.repeats or 3)
    elif args.suite == "resume":
        options = dict(images=args.images, count=args.count or 512, workers=args.workers, batch_size=args.batch_size or 32,
                       size=args.size, repeats=args.repeats or 2)
    elif args.suite == "reads":
        options = dict(ranks=args.ranks, workers=args.workers, shards=args.num_shards, count=args.count or 1600)
    else:
        options = dict(model=args.model, image_size=args.image_size, batch_size=args.batch_size or 16, steps=args.steps,
                       precision=args.precision, repeats=args.repeats or 6)
    run_suite(args.suite, **options)
    return 0


def _report_failures(failures: list[dict[str, str]]) -> int:
    """Inputs a batch command could not read: one line each on stderr; exit code 2 if any."""
    for failure in failures:
        print(f"chexdist: error: {failure['error']}", file=sys.stderr)
    if failures:
        print(f"chexdist: {len(failures)} input(s) failed (listed above); the others were processed", file=sys.stderr)
    return 2 if failures else 0


def _warn_inputs(result) -> None:
    if not result.statistics_recorded:
        print("chexdist: note: the run's shards recorded no input statistics (packed by an older chexdist); "
              "inputs are not checked against the training data", file=sys.stderr)
    for record in result.records:
        for warning in record["warnings"]:
            print(f"chexdist: warning: {record['image']}: {warning}", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from chexdist.evaluation.predict import predict_files, write_records

    result = predict_files(args.run, args.inputs, batch_size=args.batch_size, cam_dir=args.cam, cam_finding=args.finding,
                           progress=not args.quiet)
    write_records(result, args.format, args.out)
    _warn_inputs(result)
    if args.out:
        print(f"wrote {len(result.records)} prediction(s) to {args.out}", file=sys.stderr)
    return _report_failures(result.failures)


def cmd_cam(args: argparse.Namespace) -> int:
    if args.localize:
        from chexdist.evaluation.cam import format_localization, localize, write_localization

        report = localize(args.run, args.inputs, args.localize, cam_threshold=args.cam_threshold, box_frame=args.box_frame,
                          n_boot=args.bootstrap, batch_size=args.batch_size, out_dir=args.out, progress=not args.quiet)
        print(format_localization(report))
        print(f"report: {write_localization(report, args.out)}")
        return _report_failures(report["failures"])
    from chexdist.evaluation.predict import predict_files

    result = predict_files(args.run, args.inputs, batch_size=args.batch_size, cam_dir=args.out, cam_finding=args.finding,
                           progress=not args.quiet)
    _warn_inputs(result)
    for record in result.records:
        if not record["cam"]:
            print(f"{record['image']}: no finding at or above its threshold (use --finding NAME to force one)")
        for path in record["cam"]:
            print(f"{record['image']}: {path}")
    print(f"wrote {len(result.overlays)} overlay(s) to {args.out}")
    return _report_failures(result.failures)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from chexdist.evaluation.evaluate import compare_runs, evaluate_run

    if args.compare:
        if args.run or args.checkpoint != "best":
            raise ChexdistError("--compare A B takes the two runs' eval-<split>/predictions.csv; drop --run/--checkpoint")
        result = compare_runs(*args.compare, split=args.split, n_boot=args.bootstrap or 1000, seed=args.seed,
                              level=args.level or 0.95, out=args.out)
        m = result["macro"]
        show = lambda v, sign="": "n/a" if v is None else f"{v:{sign}.4f}"  # noqa: E731
        print(f"macro AUROC {show(m['auc_a'])} (a) vs {show(m['auc_b'])} (b): b - a = {show(m['diff'], '+')} "
              f"[{show(m['ci'][0], '+')}, {show(m['ci'][1], '+')}] on {result['images']} images of {result['patients']} patients")
        print(f"wrote {result['out']}/compare.json and compare.md")
        return 0
    if not args.run:
        raise ChexdistError("give --run runs/NAME (or --compare runs/A runs/B)")
    result = evaluate_run(args.run, split=args.split, checkpoint=args.checkpoint, shards=args.shards,
                          n_boot=args.bootstrap, out=args.out, seed=args.seed, level=args.level,
                          progress=not args.no_progress, plots=not args.no_plots, ci_method=args.ci)
    if result is None:  # not the main process of a launch
        return 0
    auc, f1 = result["macro"]["auc"], result["macro"]["f1"]
    ci = f" [{auc['ci'][0]:.4f}, {auc['ci'][1]:.4f}]" if auc and auc.get("ci") else ""
    print(f"{result['split']}: {result['samples']} images of {result['patients']} patients; macro AUROC "
          f"{auc['value']:.4f}{ci}, macro F1 {f1['value']:.4f} at {'val-tuned' if result['thresholds_tuned'] else 'untuned 0.5'} thresholds")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {result['out']} (metrics.json, per_class.csv, predictions.csv, report.md"
          f"{', ' + ', '.join(result['figures']) if result['figures'] else ''})")
    if args.localize:
        return _localize_split(args, result)
    return 0


def _localize_split(args: argparse.Namespace, result: dict) -> int:
    """Grad-CAM box scores on the evaluated split's own images (found under --images by file stem)."""
    import csv

    from chexdist.evaluation.cam import format_localization, localize, write_localization
    from chexdist.evaluation.inputs import expand_inputs

    if not args.images:
        raise ChexdistError("--localize needs --images DIR (the image files of the evaluated split, e.g. the NIH root)")
    with open(os.path.join(result["out"], "predictions.csv"), newline="") as f:
        keys = {row["image"] for row in csv.DictReader(f)}
    files, _ = expand_inputs(args.images)
    mine = [path for path in files if path.stem in keys]
    if not mine:
        raise ChexdistError(f"--images {' '.join(args.images)}: none of the {len(keys)} {result['split']} images is there")
    out = os.path.join(result["out"], "localization")
    report = localize(args.run, mine, args.localize, box_frame=args.box_frame, n_boot=args.bootstrap, seed=args.seed,
                      level=args.level, out_dir=out, progress=not args.no_progress)
    print(f"localization on {len(mine)} of {len(keys)} {result['split']} images:")
    print(format_localization(report))
    print(f"report: {write_localization(report, out)}")
    return _report_failures(report["failures"])


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from chexdist.runs import import_checkpoint

    info = import_checkpoint(args.src, args.arch, args.out, image_size=args.image_size, eval_resize=args.eval_resize)
    source = info["imported_from"]
    print(f"imported {source['tensors']} tensors ({source['format']}) from {args.src} into {args.out}/best.safetensors "
          "+ best.json; thresholds 0.5 (not tuned)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexdist", description=DESCRIPTION,
                                     epilog="Run `chexdist COMMAND --help` for a command's options.")
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
    p.add_argument("--split", default="random",
                   help="official (needs train_val_list.txt/test_list.txt), random, or lists (--train-list/--val-list/--test-list)")
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
    p.add_argument("--only-present", action="store_true",
                   help="pack only the CSV rows whose image file exists (the split is made over them); the rest "
                        "are counted in the manifest, not listed in errors.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name in ("train", "val", "test"):
        p.add_argument(f"--{name}-list", default=None, metavar="FILE",
                       help=f"lists: {name} image names, one per line, optionally followed by 14 labels 0/1")
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

    p = sub.add_parser("bench", help="performance suites; one JSON line per result, ratios measured in one run")
    p.add_argument("suite", choices=("loader", "pack", "train", "resume", "reads", "tune"))
    p.add_argument("--images", help="loader/pack/resume: folder of real PNGs (cycled to --count)")
    p.add_argument("--count", type=int, default=0, help="images to use (loader 1024, pack 64, resume 512, reads 1600)")
    p.add_argument("--workers", type=int, default=2, help="loader/resume/reads: DataLoader workers per rank; pack: processes vs 1")
    p.add_argument("--ranks", type=int, default=8, help="reads: simulated ranks")
    p.add_argument("--num-shards", type=int, default=80, help="reads: train shards")
    p.add_argument("--batch-size", type=int, default=0, help="loader 32, train 16")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (loader 2, pack 3, train 6)")
    p.add_argument("--formats", default="png,jpg", help="loader: shard formats; pack: the first one")
    p.add_argument("--size", type=int, default=512, help="pack/resume: shorter side of packed images")
    p.add_argument("--model", default="resnet18", help="train: model name")
    p.add_argument("--image-size", type=int, default=128, help="train: input side")
    p.add_argument("--steps", type=int, default=20, help="train: optimizer steps per timed run")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="train: autocast dtype")
    p.add_argument("--shards", default=None, help="tune: shard folder (default: synthetic shards made for the run)")
    p.add_argument("--epochs", type=int, default=2, help="tune: epochs per run (--steps caps batches per epoch)")
    p.set_defaults(func=cmd_bench)

    tuning.register(sub)

    p = sub.add_parser("demo", help="synthetic data -> shards -> 2-process DDP training -> per-class AUROC")
    p.add_argument("--out", default="chexdist-demo", help="demo folder (replaced if an earlier demo made it)")
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="probabilities and findings at the run's thresholds for PNG/JPEG files or folders")
    p.add_argument("--run", required=True, help="run folder with best.safetensors + best.json")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--format", default="json", choices=("json", "csv"))
    p.add_argument("--out", help="output file (default: standard output)")
    p.add_argument("--cam", metavar="DIR", help="also write Grad-CAM overlays of the positive findings to DIR")
    p.add_argument("--finding", help="with --cam: overlay this finding for every image instead")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("cam", help="Grad-CAM overlays; with --localize, pointing game and IoU against radiologist boxes")
    p.add_argument("--run", required=True, help="run folder with best.safetensors + best.json")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="folder for <image>_<finding>.png overlays (and the localization report)")
    p.add_argument("--finding", help="overlay this finding for every image (default: those at or above threshold)")
    p.add_argument("--localize", metavar="BBOX_CSV", help="score each box's finding against BBox_List_2017.csv boxes")
    p.add_argument("--cam-threshold", type=float, default=0.5, help="--localize: map region at >= this fraction of its max")
    p.add_argument("--box-frame", type=int, default=1024, help="--localize: box coordinates are pixels of this square frame "
                   "(NIH: 1024), scaled to each file; 0: the files' own pixels")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="--localize: patient resamples for the CIs (default: the run's eval.bootstrap, 1000 in the recipes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("evaluate", help="test-set report with patient-bootstrap CIs at val-tuned thresholds; --compare two runs")
    p.add_argument("--run", help="run folder with best.safetensors + best.json (runs/NAME)")
    p.add_argument("--split", default="test", help="split of the shards to score (test)")
    p.add_argument("--checkpoint", default="best", help="best, or a .safetensors file with its .json beside it")
    p.add_argument("--shards", default=None, help="shard folder (default: the one the run was trained on)")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="patient resamples for the CIs (0 = none; default: the run's eval.bootstrap, 1000 in the recipes)")
    p.add_argument("--level", type=float, default=None,
                   help="confidence level of the intervals (default: the run's eval.ci_level, 0.95 in the recipes)")
    p.add_argument("--ci", default="percentile", choices=("percentile", "bca"),
                   help="bootstrap interval: percentile, or bca (scipy.stats.bootstrap over patients; needs scipy)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="output folder (default runs/NAME/eval-SPLIT)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="paired patient bootstrap + DeLong of AUROC(B) - AUROC(A) on the same evaluated images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--localize", default=None, metavar="BBOX_CSV",
                   help="also score Grad-CAM against these boxes (BBox_List_2017.csv) on the split's images (--images)")
    p.add_argument("--images", nargs="+", default=None, metavar="DIR",
                   help="--localize: folders/files holding the split's images (e.g. the NIH root)")
    p.add_argument("--box-frame", type=int, default=1024,
                   help="--localize: box coordinates are pixels of this square frame (NIH: 1024; 0 = the files' own)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("import-checkpoint", help="turn a CheXNet-format checkpoint into best.safetensors + best.json")
    p.add_argument("src", help="checkpoint file (.pth/.pth.tar state dict or .safetensors)")
    p.add_argument("--arch", default="densenet121", help="architecture of the checkpoint (densenet121 or a timm name)")
    p.add_argument("--out", required=True, help="new run folder, e.g. runs/chexnet-public")
    p.add_argument("--image-size", type=int, default=224, help="input side the model expects (center crop)")
    p.add_argument("--eval-resize", type=int, default=256, help="resize before the center crop")
    p.set_defaults(func=cmd_import_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with process_group_released():
            return func(args)
    except ChexdistError as exc:
        print(f"chexdist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chexdist: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
