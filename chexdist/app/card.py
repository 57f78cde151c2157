"""The model card the page shows: what the model is and how well it did, read from the run's
best.json and, when `chexdist evaluate` has been run, its `eval-test/metrics.json`."""

from __future__ import annotations

import json
from typing import Any

NOTICE = ("Research tool, not for diagnosis: the findings and heatmaps are a model's output, not a "
          "medical opinion, and must not be used for clinical decisions.")


def _test_metrics(loaded: Any) -> dict[str, Any] | None:
    """Test AUROC (macro and per finding) with the CIs `chexdist evaluate` wrote, if it has run."""
    if loaded.run_dir is None:
        return None
    path = loaded.run_dir / "eval-test" / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    auc = lambda entry: None if not entry else {"value": entry.get("value"), "ci": entry.get("ci")}  # noqa: E731
    return {
        "samples": metrics.get("samples"),
        "patients": metrics.get("patients"),
        "macro_auc": auc((metrics.get("macro") or {}).get("auc")),
        "auc": {name: auc(entry.get("auc")) for name, entry in (metrics.get("per_class") or {}).items()},
        "level": (metrics.get("bootstrap") or {}).get("level"),
    }


def _training_data(info: dict[str, Any]) -> dict[str, Any]:
    shards = info.get("shards") or {}
    source = shards.get("source") or {}
    image = shards.get("image") or {}
    return {
        "source": source.get("csv") or source.get("dataset") or None,
        "sha256": source.get("csv_sha256") or source.get("sha256") or None,
        "rows": source.get("rows"),
        "split": (shards.get("split") or {}).get("method"),
        "packed_size": image.get("size"),
        "shards": (info.get("config") or {}).get("data", {}).get("shards"),
    }


def model_card(loaded: Any) -> dict[str, Any]:
    from chexdist.evaluation.cam import GradCam

    info = loaded.info
    val = info.get("val_metrics") or {}
    try:
        cam_layer = GradCam(loaded.model).layer_name
    except Exception:  # grad-cam not installed: the card still shows, /api/cam says what is missing
        cam_layer = None
    return {
        "arch": info.get("arch"),
        "recipe": info.get("recipe") or None,
        "image_size": info.get("image_size"),
        "epoch": info.get("epoch"),
        "chexdist_version": info.get("chexdist_version"),
        "thresholds_tuned": bool(info.get("thresholds_tuned", True)),
        "thresholds": info.get("thresholds"),
        "training_data": _training_data(info),
        "val_auc_mean": val.get("val_auc_mean"),
        "val_auc": val.get("val_auc"),
        "test": _test_metrics(loaded),
        "cam_layer": cam_layer,
        "notice": NOTICE,
    }
