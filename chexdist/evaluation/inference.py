"""Inference on exported models: load a run (weights, best.json, its config and eval transform) and
the gathered prediction pass over one packed split (every readable sample exactly once across ranks).

Used by the engine's validation and by `chexdist evaluate` (and `predict` / `cam`), so all of them
score the same way and none of them imports the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexdist.config import Config, config_from_dict
from chexdist.data.loader import build_eval_loader
from chexdist.data.transforms import eval_transform
from chexdist.errors import ChexdistError
from chexdist.models.arch import resolve_normalization


@dataclass
class LoadedRun:
    """An exported model ready for inference: `transform` maps uint8 gray [1,H,W] (or HxW numpy)
    to the normalized [3,h,w] input it was validated with."""

    model: torch.nn.Module
    info: dict[str, Any]
    config: Config
    transform: Any
    weights: Path
    run_dir: Path | None

    @property
    def thresholds(self) -> dict[str, float]:
        return self.info["thresholds"]

    @property
    def thresholds_tuned(self) -> bool:
        """False for imported checkpoints (0.5 everywhere): their F1 is not a val-tuned F1."""
        return bool(self.info.get("thresholds_tuned", True))


def load_run(run: str | os.PathLike, checkpoint: str | os.PathLike | None = "best") -> LoadedRun:
    """A run folder's exported model (`checkpoint` "best"/None), or `checkpoint` = a weights file
    with its JSON beside it (best.json format). Refuses missing files and label-order mismatches."""
    from chexdist.runs import load_best

    run_path = Path(run) if run is not None else None
    if run_path is not None and not run_path.is_dir():
        raise ChexdistError(f"{run_path}: no such run folder; pass --run runs/NAME (a folder with best.safetensors + best.json)")
    if checkpoint in (None, "", "best"):
        if run_path is None:
            raise ChexdistError("no run folder and no --checkpoint given")
        target: Path = run_path
    else:
        target = Path(checkpoint)
    model, info = load_best(target)
    config = config_from_dict(info["config"])
    weights = target / "best.safetensors" if target.is_dir() else target
    return LoadedRun(model, info, config, eval_transform(config, info.get("normalization")), weights, run_path)


@dataclass
class Predictions:
    """Gathered, de-padded predictions of one split, ordered by sample index."""

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    patient_id: torch.Tensor
    skipped: int
    keys: list[str] = field(default_factory=list)

    @property
    def probs(self) -> np.ndarray:
        return torch.sigmoid(self.logits).numpy()


def split_loader(accelerator, shards: str, split: str, config: Config, manifest: dict, *, transform,
                 persistent_workers: bool = False):
    """This rank's eval loader of `split` (uint8 batches, `transform` minus its normalization, which
    `loader.normalize` applies on the device)."""
    loader, _ = build_eval_loader(
        shards,
        split,
        config.data.eval_batch_size or 2 * config.data.batch_size,
        transform,
        config.data.num_workers,
        accelerator.num_processes,
        accelerator.process_index,
        manifest=manifest,
        pin_memory=accelerator.device.type == "cuda",
        normalize_in_loader=False,
        persistent_workers=persistent_workers,
    )
    return loader


def predict_split(
    model,
    accelerator,
    shards: str,
    split: str,
    config: Config,
    manifest: dict,
    *,
    loader=None,
    transform=None,
    normalization: dict[str, list[float]] | None = None,
    with_keys: bool = False,
    progress: bool = False,
) -> Predictions:
    """Run the model over one split on every rank and gather: each readable sample exactly once.

    `loader` (from :func:`split_loader`) lets a caller that scores the split every epoch keep its
    workers. Otherwise `transform` defaults to the config's eval transform normalized with
    `normalization` (the one the model was trained with, best.json's; by default the model's own,
    `models.arch.resolve_normalization`). `with_keys` also gathers the image keys (strings, through
    accelerate's gather_object); `progress` shows a bar on the main process when stderr is a terminal.
    """
    if loader is None:
        if transform is None:
            transform = eval_transform(config, resolve_normalization(accelerator.unwrap_model(model), given=normalization))
        loader = split_loader(accelerator, shards, split, config, manifest, transform=transform)
    skipped_before = loader.skipped
    from tqdm.auto import tqdm

    show = progress and accelerator.is_main_process
    bar = tqdm(total=len(loader), desc=f"{split} ({accelerator.num_processes} process(es))", unit="batch",
               leave=False, disable=None if show else True)
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "targets": [], "valid": [], "index": [], "patient_id": []}
    keys: list[str] = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            images = loader.normalize(batch.images.to(accelerator.device, non_blocking=True))
            with accelerator.autocast():
                logits = model(images)
            parts["logits"].append(logits.float())
            parts["targets"].append(batch.labels.to(accelerator.device))
            parts["valid"].append(batch.valid.to(accelerator.device))
            parts["index"].append(batch.index.to(accelerator.device))
            parts["patient_id"].append(batch.patient_id.to(accelerator.device))
            keys.extend(batch.keys)
            bar.update(1)
    bar.close()
    local = {k: torch.cat(v) for k, v in parts.items()}
    gathered = {k: accelerator.gather(v).cpu() for k, v in local.items()}
    skipped = int(accelerator.reduce(torch.tensor(loader.skipped - skipped_before, device=accelerator.device), "sum").item())
    keep = gathered["valid"].bool()
    order = torch.argsort(gathered["index"][keep])
    all_keys: list[str] = []
    if with_keys:
        from accelerate.utils import gather_object

        gathered_keys = gather_object(keys) if accelerator.num_processes > 1 else keys
        kept_keys = [k for k, v in zip(gathered_keys, keep.tolist()) if v]
        all_keys = [kept_keys[i] for i in order.tolist()]
    return Predictions(
        logits=gathered["logits"][keep][order],
        targets=gathered["targets"][keep][order].float(),
        index=gathered["index"][keep][order],
        patient_id=gathered["patient_id"][keep][order],
        skipped=skipped,
        keys=all_keys,
    )
