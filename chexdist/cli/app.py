"""`chexdist app`: the local web page and JSON API over one exported run (the [app] extra)."""

from __future__ import annotations

import argparse

from chexdist.errors import ChexdistError


def cmd_app(args: argparse.Namespace) -> int:
    from chexdist.app.server import serve

    if args.max_upload_mb <= 0:
        raise ChexdistError(f"--max-upload-mb {args.max_upload_mb} must be > 0")
    if not 0 <= args.port <= 65535:
        raise ChexdistError(f"--port {args.port} must be in 0..65535")
    return serve(args.run, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, workers=args.workers,
                 queue=args.queue, access_log=not args.quiet)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `app` to the `chexdist` subcommands."""
    p = sub.add_parser("app", help="local web page + JSON API: upload an X-ray, see findings, thresholds and Grad-CAM")
    p.add_argument("--run", required=True, help="run folder with best.safetensors + best.json")
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1: this machine only; "
                   "0.0.0.0 exposes the app to the network and prints a warning)")
    p.add_argument("--max-upload-mb", type=float, default=50, help="uploads above this get 413 before they are read (50)")
    p.add_argument("--workers", type=int, default=1, help="inference threads, each with its own model copy (1)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a worker; more get 503 (64)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=cmd_app)
