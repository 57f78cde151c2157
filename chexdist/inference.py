"""Gathered inference over one packed split: every readable sample exactly once across ranks.

Used by the engine's validation and by `chexdist evaluate`, so the two score the same way and
evaluation never imports the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chexdist.config import Config
from chexdist.data import build_eval_loader
from chexdist.transforms import build_transform


@dataclass
class Predictions:
    """Gathered, de-padded predictions of one split, ordered by sample index."""

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    patient_id: torch.Tensor
    skipped: int

    @property
    def probs(self) -> np.ndarray:
        return torch.sigmoid(self.logits).numpy()


def predict_split(model, accelerator, shards: str, split: str, config: Config, manifest: dict) -> Predictions:
    """Run the model over one split on every rank and gather: each readable sample exactly once."""
    transform = build_transform(
        config.aug.preset, image_size=config.data.image_size, eval_resize=config.data.eval_resize, train=False
    )
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
    )
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "targets": [], "valid": [], "index": [], "patient_id": []}
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
    local = {k: torch.cat(v) for k, v in parts.items()}
    gathered = {k: accelerator.gather(v).cpu() for k, v in local.items()}
    skipped = int(accelerator.reduce(torch.tensor(loader.skipped, device=accelerator.device), "sum").item())
    keep = gathered["valid"].bool()
    order = torch.argsort(gathered["index"][keep])
    return Predictions(
        logits=gathered["logits"][keep][order],
        targets=gathered["targets"][keep][order].float(),
        index=gathered["index"][keep][order],
        patient_id=gathered["patient_id"][keep][order],
        skipped=skipped,
    )
