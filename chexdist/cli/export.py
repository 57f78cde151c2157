"""`chexdist export`: a run as one ONNX file or a torch.export program, for deployment."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from chexdist.evaluation.export import export_run, info_name

    target = export_run(args.run, args.format, args.out)
    print(f"wrote {target} and {target.parent / info_name(args.format)} (preprocessing, labels, thresholds)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export` to the `chexdist` subcommands."""
    p = sub.add_parser("export", help="export a run's model as ONNX (dynamic batch, one file) or a torch.export .pt2")
    p.add_argument("--run", required=True, help="run folder with best.safetensors + best.json")
    p.add_argument("--format", required=True, choices=("onnx", "pt2"))
    p.add_argument("--out", default=None, help="output folder (default RUN/export)")
    p.set_defaults(func=cmd_export)
