"""The exported-run format: `best.safetensors` + `best.json` (labels, arch, thresholds tuned on val,
normalization, config), written by training and read by evaluation, predict, cam, the app and export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from chexdist import __version__
from chexdist.config import Config, config_from_dict, config_to_dict, load_config
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NUM_LABELS, check_labels
from chexdist.models.arch import resolve_normalization
from chexdist.models.factory import create_model
from chexdist.models.weights import load_pretrained, read_state_dict, save_weights
from chexdist.utils.fileio import atomic_write_json, sha256_file


def best_files(run_or_file: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, info JSON) of an exported model: a run folder (best.safetensors + best.json) or a
    weights file with its JSON beside it (same stem). Refuses what is missing with the fix."""
    path = Path(run_or_file)
    if not path.exists():
        raise ChexdistError(f"{path}: no such run folder or checkpoint file; train one (chexdist train) or import one (chexdist import-checkpoint)")
    weights = path / "best.safetensors" if path.is_dir() else path
    info_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise ChexdistError(f"{path}: no best.safetensors; the run has not exported a best model yet (train it, or chexdist import-checkpoint)")
    if not info_path.is_file():
        raise ChexdistError(
            f"{weights}: no {info_path.name} beside it (labels, arch, thresholds); a bare checkpoint cannot be scored: "
            "import it with chexdist import-checkpoint"
        )
    return weights, info_path


BEST_INFO_KEYS = ("labels", "arch", "thresholds", "config")


def read_best_info(info_path: str | os.PathLike) -> dict[str, Any]:
    """best.json, checked: parses, names chexdist's labels in order, has what loading needs."""
    info_path = Path(info_path)
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChexdistError(f"{info_path}: not readable JSON ({exc}); re-export the run") from None
    if not isinstance(info, dict):
        raise ChexdistError(f"{info_path}: must hold a JSON object")
    missing = [k for k in BEST_INFO_KEYS if k not in info]
    if missing:
        raise ChexdistError(f"{info_path}: missing key(s) {', '.join(missing)}; re-export the run")
    check_labels(info["labels"], source=str(info_path))
    return info


def load_best(run_or_file: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported best model (eval mode, CPU) and its best.json; refuses a label order other than
    chexdist's. `run_or_file`: a run folder, or a .safetensors file with its .json beside it."""
    weights, info_path = best_files(run_or_file)
    info = read_best_info(info_path)
    state, meta = read_state_dict(weights)
    if "labels" in meta:
        check_labels(json.loads(meta["labels"]), source=str(weights))
    cfg = config_from_dict(info["config"])
    model = create_model(info["arch"], num_classes=len(info["labels"]), drop_rate=cfg.model.drop_rate, head=cfg.model.head)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ChexdistError(f"{weights}: does not fit arch {info['arch']!r} from {info_path.name} ({first})") from None
    return model.eval(), info


def import_checkpoint(src: str | os.PathLike, arch: str, out: str | os.PathLike, image_size: int = 224,
                      eval_resize: int = 256) -> dict[str, Any]:
    """Write `out`/best.safetensors + best.json from a foreign checkpoint (CheXNet format: DataParallel
    `module.` prefix, old `norm.1` names, Sequential classifier; or a plain state dict), so evaluate,
    predict and cam run on it. Loads with weights_only=True; the classifier must be in the file with
    14 outputs in chexdist's label order (CheXNet's order). Thresholds are 0.5, marked not tuned.
    Refuses to overwrite an existing export. Normalization is ImageNet's, whatever the arch: the
    one the CheXNet family was trained with; a foreign checkpoint does not record its own."""
    out = Path(out)
    if (out / "best.safetensors").exists() or (out / "best.json").exists():
        raise ChexdistError(f"{out}: already holds best.safetensors/best.json; choose a new --out (nothing is overwritten)")
    src_path = Path(src)
    if not src_path.is_file():
        raise ChexdistError(f"{src_path}: checkpoint file not found")
    config = load_config(None, overrides=[f"model.name={arch}", f"data.image_size={image_size}", f"data.eval_resize={eval_resize}"])
    model = create_model(arch)
    report = load_pretrained(model, src_path, arch=arch)
    if report["classifier_reinitialized"]:
        raise ChexdistError(
            f"{src_path}: has no {NUM_LABELS}-output classifier for {arch} (absent or another shape); "
            "only a checkpoint trained on the 14 ChestX-ray14 findings can be imported for evaluation"
        )
    labels = list(LABELS)
    info = {
        "labels": labels,
        "arch": arch,
        "recipe": "",
        "image_size": image_size,
        "eval_resize": eval_resize,
        "normalization": resolve_normalization(),
        "thresholds": {name: 0.5 for name in labels},
        "thresholds_tuned": False,
        "val_metrics": None,
        "epoch": None,
        "step": None,
        "chexdist_version": __version__,
        "imported_from": {"path": str(src_path.resolve()), "sha256": sha256_file(src_path), "format": report["source"],
                          "tensors": report["loaded"]},
        "config": config_to_dict(config),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "best.safetensors", labels=labels, metadata={"imported_from": src_path.name})
    atomic_write_json(out / "best.json", info)
    return info


def export_best(model: torch.nn.Module, out: Path, info: dict[str, Any]) -> None:
    """Write `out`/best.safetensors (labels and recipe in its metadata) and then `out`/best.json."""
    save_weights(model, out / "best.safetensors", labels=info["labels"], metadata={"recipe": info["recipe"]})
    atomic_write_json(out / "best.json", info)


def best_info(config: Config, record: dict[str, Any], manifest: dict, normalization: dict[str, list[float]],
              weights: str = "raw", lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """best.json of a trained run: `record` is the best epoch's metrics.jsonl record (of the weights
    exported: `weights` raw or ema), `normalization` the one the model was trained with, `lineage`
    the shards (manifest sha256, split and patient counts) and the training-patient digest."""
    return {
        "labels": list(LABELS),
        "arch": config.model.name,
        "recipe": config.recipe,
        "image_size": config.data.image_size,
        "eval_resize": config.data.resolved_eval_resize,
        "crop_pct": config.data.crop_pct,
        "normalization": normalization,
        "global_batch": record["global_batch"],
        "lr": record["lr"],
        "base_lr": record["base_lr"],
        "precision": record["precision"],
        "world_size": record["world_size"],
        "thresholds": record["val_thresholds"],
        "val_metrics": {k: record[k] for k in ("val_loss", "val_auc_mean", "val_ap_mean", "val_f1_mean", "val_auc", "val_f1")},
        "epoch": record["epoch"],
        "step": record["step"],
        "chexdist_version": __version__,
        "shards": {"image": manifest["image"], "split": manifest["split"], "source": manifest["source"]},
        "weights": weights,
        "data": lineage or {},
        "config": config_to_dict(config),
    }


METRICS_FILE = "metrics.jsonl"


def read_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's `metrics.jsonl` records, one per finished epoch (empty when the run has none yet)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
