"""Evaluation commands: `chexdist predict`, `chexdist cam`, `chexdist evaluate`, `chexdist import-checkpoint`."""

from __future__ import annotations

import argparse
import os
import sys

from chexdist.errors import ChexdistError


def _failure_message(failure: dict[str, str]) -> str:
    """A missing file is named as such, not as an image that failed to decode."""
    if not os.path.lexists(failure["image"]):
        return f"{failure['image']}: file not found"
    return failure["error"]


def _report_failures(failures: list[dict[str, str]], processed: bool = True) -> int:
    """Inputs a batch command could not read: one line each on stderr; exit code 2 if any.
    `processed` says whether any other input was read (else there are no "others" to mention)."""
    for failure in failures:
        print(f"chexdist: error: {_failure_message(failure)}", file=sys.stderr)
    if failures and processed:
        print(f"chexdist: {len(failures)} input(s) failed (listed above); the others were processed", file=sys.stderr)
    elif len(failures) > 1:
        print(f"chexdist: none of the {len(failures)} inputs could be read (listed above)", file=sys.stderr)
    return 2 if failures else 0


def _warn_inputs(result) -> None:
    if not result.records:
        return
    if not result.statistics_recorded:
        print("chexdist: note: the run's shards recorded no input statistics (packed by an older chexdist); "
              "inputs are not checked against the training data", file=sys.stderr)
    for record in result.records:
        for warning in record["warnings"]:
            print(f"chexdist: warning: {record['image']}: {warning}", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from chexdist.evaluation.predict import predict_files, write_records

    result = predict_files(args.run, args.inputs, batch_size=args.batch_size, cam_dir=args.cam, cam_finding=args.finding,
                           progress=not args.quiet, backend=args.backend, onnx_model=args.onnx)
    write_records(result, args.format, args.out)
    _warn_inputs(result)
    if args.out:
        print(f"wrote {len(result.records)} prediction(s) to {args.out}", file=sys.stderr)
    return _report_failures(result.failures, processed=bool(result.records))


def _localized(report: dict) -> bool:
    """Whether localize read any image (an image it read has a box scored or outside the crop)."""
    return report["boxes_scored"] + report["boxes_outside_crop"] > 0


def cmd_cam(args: argparse.Namespace) -> int:
    if args.localize:
        from chexdist.evaluation.cam import format_localization, localize, write_localization

        report = localize(args.run, args.inputs, args.localize, cam_threshold=args.cam_threshold, box_frame=args.box_frame,
                          n_boot=args.bootstrap, batch_size=args.batch_size, out_dir=args.out, progress=not args.quiet)
        print(format_localization(report))
        print(f"report: {write_localization(report, args.out)}")
        return _report_failures(report["failures"], processed=_localized(report))
    from chexdist.evaluation.cam import NO_EVIDENCE
    from chexdist.evaluation.predict import predict_files

    result = predict_files(args.run, args.inputs, batch_size=args.batch_size, cam_dir=args.out, cam_finding=args.finding,
                           progress=not args.quiet)
    _warn_inputs(result)
    for record in result.records:
        if not record["cam"] and not record["cam_empty"]:
            print(f"{record['image']}: no finding at or above its threshold (use --finding NAME to force one)")
        for finding in record["cam_empty"]:
            print(f"{record['image']}: {finding}: {NO_EVIDENCE} (no overlay written)")
        for path in record["cam"]:
            print(f"{record['image']}: {path}")
    if result.records:
        print(f"wrote {len(result.overlays)} overlay(s) to {args.out}")
    return _report_failures(result.failures, processed=bool(result.records))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from chexdist.evaluation.evaluate import compare_runs, evaluate_run

    if args.compare:
        if args.run or args.checkpoint != "best":
            raise ChexdistError("--compare A B takes the two runs' eval-<split>/predictions.csv; drop --run/--checkpoint")
        result = compare_runs(*args.compare, split=args.split, n_boot=args.bootstrap or 1000, seed=args.seed,
                              level=args.level or 0.95, out=args.out)
        m = result["macro"]
        show = lambda v, sign="": "n/a" if v is None else f"{v:{sign}.4f}"  # noqa: E731
        from chexdist.evaluation.evaluate import p_text

        print(f"macro AUROC {show(m['auc_a'])} (a) vs {show(m['auc_b'])} (b): b - a = {show(m['diff'], '+')} "
              f"[{show(m['ci'][0], '+')}, {show(m['ci'][1], '+')}], bootstrap p {p_text(m['p_boot'], m['resamples'])}, "
              f"from {result['bootstrap']['n_boot']} paired patient resamples on {result['images']} images of {result['patients']} patients")
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
    boot = result["bootstrap"]
    ci = (f" [{auc['ci'][0]:.4f}, {auc['ci'][1]:.4f}] ({boot['level']:.0%} CI, {boot['n_boot']} patient resamples)"
          if auc and auc.get("ci") else "")
    show = lambda e: "n/a" if e is None else f"{e['value']:.4f}"  # noqa: E731
    print(f"{result['split']}: {result['samples']} images of {result['patients']} patients; macro AUROC "
          f"{show(auc)}{ci}, macro F1 {show(f1)} at {'val-tuned' if result['thresholds_tuned'] else 'untuned 0.5'} thresholds")
    reasons: dict[str, list[str]] = {}
    for name, why in (result.get("not_scored") or {}).items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        print(f"not scored: {', '.join(names)}: {why}")
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
    return _report_failures(report["failures"], processed=_localized(report))


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from chexdist.runs import import_checkpoint

    info = import_checkpoint(args.src, args.arch, args.out, image_size=args.image_size, eval_resize=args.eval_resize)
    source = info["imported_from"]
    print(f"imported {source['tensors']} tensors ({source['format']}) from {args.src} into {args.out}/best.safetensors "
          "+ best.json; thresholds 0.5 (not tuned)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `predict`, `cam`, `evaluate` and `import-checkpoint` to the `chexdist` subcommands."""
    p = sub.add_parser("predict", help="probabilities and findings at the run's thresholds for PNG/JPEG files or folders")
    p.add_argument("--run", required=True, help="run folder with best.safetensors + best.json")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--format", default="json", choices=("json", "csv"))
    p.add_argument("--out", help="output file (default: standard output)")
    p.add_argument("--cam", metavar="DIR", help="also write Grad-CAM overlays of the positive findings to DIR")
    p.add_argument("--finding", help="with --cam: overlay this finding for every image instead")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="onnx: run the model chexdist export wrote in onnxruntime (no Grad-CAM)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="--backend onnx: the model file (default RUN/export/model.onnx)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    _register_cam(sub)
    _register_evaluate(sub)

    p = sub.add_parser("import-checkpoint", help="turn a CheXNet-format checkpoint into best.safetensors + best.json")
    p.add_argument("src", help="checkpoint file (.pth/.pth.tar state dict or .safetensors)")
    p.add_argument("--arch", default="densenet121", help="architecture of the checkpoint (densenet121 or a timm name)")
    p.add_argument("--out", required=True, help="new run folder, e.g. runs/chexnet-public")
    p.add_argument("--image-size", type=int, default=224, help="input side the model expects (center crop)")
    p.add_argument("--eval-resize", type=int, default=256, help="resize before the center crop")
    p.set_defaults(func=cmd_import_checkpoint)


def _register_cam(sub: argparse._SubParsersAction) -> None:
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


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
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
