"""What the Ray Tune tests share: the tiny space, the fixed overrides, and readers of a search's outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import psutil

from chexdist.cli.main import main as cli_main
from tests.conftest import REPO


TINY_SPACE = REPO / "tune" / "spaces" / "tiny.yaml"
FIXED = ["data.image_size=40", "data.eval_resize=48", "data.max_train_batches=4", "eval.bootstrap=0"]
METRIC_KEYS = {"epoch", "step", "lr", "train_loss", "val_loss", "val_auc_mean", "val_ap_mean", "val_f1_mean", "val_auc",
               "val_ap", "val_f1", "val_samples", "val_skipped", "seconds", "world_size", "precision"}


def ray_processes_under(folder: str) -> list[tuple[int, str]]:
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and folder in " ".join(proc.info["cmdline"] or []):
                left.append((proc.info["pid"], " ".join(proc.info["cmdline"])[:120]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


def tune_args(shards: Path, storage: Path, name: str, *extra: str, space: Path = TINY_SPACE) -> list[str]:
    args = ["--space", str(space), "--recipe", "tiny", "--shards", str(shards), "--storage", str(storage), "--name", name]
    for item in FIXED:
        args += ["--set", item]
    return args + list(extra)


def run_cli(args: list[str]) -> int:
    import ray

    try:
        return cli_main(["tune", *args])
    finally:
        ray.shutdown()


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def trial_results(trial_dir: Path) -> list[dict]:
    """Ray's per-report results of one trial (must be strict JSON)."""
    return [strict_json(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trial_index(row: dict) -> int:
    """The trial's position in the search's sampling order (`<experiment id>_<index>`)."""
    return int(row["trial"].rsplit("_", 1)[1])


def split_samples(shards: Path, split: str) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return sum(entry["samples"] for entry in manifest["splits"][split]["shards"])


def trial_failures(exp: Path) -> dict[str, int]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.num_failures for t in ExperimentAnalysis(str(exp)).trials}
