"""Data commands: `chexdist synth`, `chexdist pack`, `chexdist shards verify|info`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from chexdist.errors import ChexdistError


def default_workers() -> int:
    """Processes to use by default: the CPUs this process may run on, capped at 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def cmd_synth(args: argparse.Namespace) -> int:
    from chexdist.data.synth import make_synthetic_nih

    if args.layout != "nih":
        from chexdist.data.synthlayouts import make_synthetic

        summary = make_synthetic(args.out, args.layout, images=args.images, size=args.size, seed=args.seed)
        print(f"wrote a synthetic {args.layout} dataset ({summary['studies']} studies of {summary['patients']} patients) "
              f"to {args.out}; pack it with: chexdist pack {' '.join(summary['pack_args'])} --out shards/{args.layout}")
        return 0
    summary = make_synthetic_nih(args.out, images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {summary['images']} images of {summary['patients']} patients to {args.out}")
    return 0


def _pack_root(args: argparse.Namespace) -> str:
    """--root, or --nih-root (today's spelling, which implies --dataset nih)."""
    if args.nih_root is not None:
        if args.root is not None or args.dataset not in (None, "nih"):
            raise ChexdistError("--nih-root is --dataset nih --root DIR; give either --nih-root or --dataset/--root")
        args.dataset = "nih"
        return args.nih_root
    if args.root is None:
        raise ChexdistError("chexdist pack needs --root DIR (or --nih-root DIR for NIH)")
    args.dataset = args.dataset or "nih"
    return args.root


def cmd_pack(args: argparse.Namespace) -> int:
    from chexdist.data.datasets import get_dataset
    from chexdist.data.datasets.base import parse_views
    from chexdist.data.pack import PackSettings, merge_tasks, pack_dataset, pack_task

    root = args.nih_root = _pack_root(args)
    dataset = get_dataset(args.dataset)
    settings = PackSettings(
        dataset=args.dataset,
        dataset_options=dataset.options(args),
        uncertain=args.uncertain,
        views=parse_views(args.views),
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
        record = pack_task(root, args.out, settings, args.task_index, args.num_tasks,
                           workers=args.workers, progress=not args.quiet)
        print(f"task {args.task_index} of {args.num_tasks}: packed {len(record['shards'])} shard(s), "
              f"{record['samples']} samples, {record['errors']} skipped, into {args.out}; "
              "run --merge when every task is done")
        return 0
    if args.merge:
        manifest = merge_tasks(root, args.out, settings, num_tasks=args.num_tasks)
    elif args.num_tasks is not None:
        raise ChexdistError("--num-tasks goes with --task-index I (one array task) or --merge")
    else:
        manifest = pack_dataset(root, args.out, settings, workers=args.workers, progress=not args.quiet)
    _print_pack_summary(args, manifest)
    return 0


def _print_pack_summary(args: argparse.Namespace, manifest: dict) -> None:
    """What a finished pack holds, and what it could not pack or score."""
    from chexdist.data.packmanifest import unscorable_splits

    counts = ", ".join(f"{s} {v['samples']} ({v['patients']} patients)" for s, v in manifest["splits"].items())
    print(f"packed {counts} into {args.out}")
    missing = manifest["missing"]
    if missing["rows"]:
        rows = manifest["source"]["rows"]
        by_folder = dict(missing["by_folder"])
        outside = by_folder.pop("(no folder)", 0)
        nih = manifest.get("dataset", "nih") == "nih"  # NIH's folders are file-name ranges (see nih.missing_by_folder)
        where = [f"{n:,} {'within the file-name range of' if nih else 'under'} {folder}" for folder, n in by_folder.items()]
        where += [f"{outside:,} outside every image folder's range"] if outside else []
        print(f"{missing['rows']:,} of {rows:,} rows of {manifest['source']['csv']} ({missing['rows'] / rows:.1%}) "
              f"have no image file under {args.nih_root}: {'; '.join(where)}")
        if missing["in_errors"]:
            print("  they are listed in errors.jsonl; pass --only-present to pack only the rows that have files "
                  "(split over those rows) and count the rest instead of listing them")
    if manifest.get("left_out"):
        print("left out: " + ", ".join(f"{n:,} {why}" for why, n in manifest["left_out"].items()))
    if manifest["errors"]:
        reasons = ", ".join(f"{n:,} {k}" for k, n in manifest["error_reasons"].items())
        print(f"skipped {manifest['errors']:,} input(s) ({reasons}); listed in {os.path.join(args.out, 'errors.jsonl')}")
    for split, reasons in unscorable_splits(manifest).items():
        unlabelled = [label for label, why in reasons.items() if why == "unknown in every sample"]
        reasons = {label: why for label, why in reasons.items() if label not in unlabelled}
        if unlabelled and split == "test":
            print(f"not labelled in this dataset (unknown, never scored): {', '.join(unlabelled)}")
        if not reasons:
            continue
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


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from chexdist.data.verify import verify_shards

    report = verify_shards(args.path, workers=args.workers)
    for problem in report["problems"]:
        print(f"FAIL {problem}")
    status = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"{status}: {report['shards']} shards, {report['samples']} samples verified in {args.path}")
    return 0 if report["ok"] else 1


def format_info(manifest: dict) -> str:
    """A plain-text table of splits, patients and prevalence for `chexdist shards info`."""
    from chexdist.data.splits import SPLITS

    splits = [s for s in SPLITS if s in manifest["splits"]]
    lines = [
        f"format {manifest['image']['format']}, size {manifest['image']['size']}, "
        f"split {manifest['split']['method']} (seed {manifest['split']['seed']}), "
        f"source {manifest['source']['csv']}, errors {manifest['errors']}",
        "",
        f"{'':20s}" + "".join(f"{s:>16s}" for s in splits),
    ]

    def row(title: str, values: list[str]) -> None:
        lines.append(f"{title:20s}" + "".join(f"{v:>16s}" for v in values))

    row("images", [str(manifest["splits"][s]["samples"]) for s in splits])
    row("patients", [str(manifest["splits"][s]["patients"]) for s in splits])
    row("shards", [str(len(manifest["splits"][s]["shards"])) for s in splits])
    from chexdist.data.shardformat import split_label_counts

    counts = {s: split_label_counts(manifest["splits"][s]) for s in splits}
    for label in manifest["labels"]:
        cells = []
        for s in splits:
            pos, neg = counts[s]["positives"][label], counts[s]["negatives"][label]
            cells.append(f"{pos} ({100 * pos / (pos + neg):.1f}%)" if pos + neg else "unknown")
        row(label, cells)
    return "\n".join(lines)


def cmd_shards_info(args: argparse.Namespace) -> int:
    from chexdist.data.shardformat import load_manifest

    manifest = load_manifest(args.path)
    print(json.dumps(manifest, indent=2) if args.json else format_info(manifest))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `synth`, `pack` and `shards` to the `chexdist` subcommands."""
    p = sub.add_parser("synth", help="write a synthetic dataset in a release's exact file layout (NIH by default)")
    p.add_argument("out", help="output folder (becomes the --root of chexdist pack)")
    p.add_argument("--layout", default="nih", choices=("nih", "chexpert", "mimic", "padchest", "csv"),
                   help="the release whose files to write (default nih)")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    _register_pack(sub)

    shards = sub.add_parser("shards", help="inspect or verify packed shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("verify", help="re-check checksums, counts, decoding, labels and patient leakage")
    p.add_argument("path")
    p.add_argument("--workers", type=int, default=default_workers())
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("info", help="table of splits, patients and prevalence")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_shards_info)


def _register_pack(sub: argparse._SubParsersAction) -> None:
    from chexdist.data.datasets import REGISTRY, available

    p = sub.add_parser("pack", help="pack a dataset (NIH, CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, a CSV) into WebDataset shards")
    p.add_argument("--dataset", default=None, help=f"one of {', '.join(REGISTRY)} (default nih)")
    p.add_argument("--root", default=None, help="the dataset's download folder")
    p.add_argument("--nih-root", default=None, help="= --dataset nih --root DIR (Data_Entry_2017*.csv[.gz] and images)")
    p.add_argument("--uncertain", default="ignore", help="uncertain (-1) labels: ignore (unknown), ones or zeros")
    p.add_argument("--views", default="PA,AP", help="views to keep, e.g. PA,AP (default) or all (laterals too)")
    p.add_argument("--out", required=True, help="shard folder, e.g. shards/nih")
    p.add_argument("--split", default="random",
                   help="official (needs train_val_list.txt/test_list.txt), random, or lists (--train-list/--val-list/--test-list)")
    p.add_argument("--size", type=int, default=512, help="shorter side in pixels; 0 keeps the original")
    p.add_argument("--format", default="png", help="png (lossless) or jpg (about 4x faster to decode)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode processes")
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
    for name, dataset in available().items():
        dataset.add_pack_arguments(p.add_argument_group(f"--dataset {name}", dataset.summary))
    p.set_defaults(func=cmd_pack)
