"""Checkpoints have one owner: the loop position (`TrainState`), how checkpoint folders are named,
listed and parsed, and saving/resuming them (`Checkpointer`). The tuner asks this module."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple


SHAPE_KEYS = {
    "world_size": "processes",
    "num_workers": "data.num_workers",
    "batch_size": "per-process batch",
    "grad_accum": "train.grad_accum",
}


@dataclass
class TrainState:
    """Loop position and early-stopping memory, checkpointed with the model (torchtitan style)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches of the current epoch already consumed (mid-epoch checkpoints)
    loss_sum: float = 0.0
    loss_batches: int = 0
    epoch_seconds: float = 0.0
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    # the shape the current epoch's plan was made for (0 = a checkpoint from before it was recorded)
    world_size: int = 0
    num_workers: int = 0
    batch_size: int = 0
    grad_accum: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_name(state: TrainState) -> str:
    """The folder name of a checkpoint at `state`; names sort in training order."""
    return f"step{state.step:09d}-epoch{state.epoch:04d}-batch{state.batch:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))


class CheckpointPosition(NamedTuple):
    step: int
    epoch: int
    batch: int


_NAME = re.compile(r"step(\d+)-epoch(\d+)-batch(\d+)")


def checkpoint_position(folder: str | Path) -> CheckpointPosition:
    """(step, epoch, batch) of a checkpoint folder, from the name `checkpoint_name` gave it."""
    match = _NAME.fullmatch(Path(folder).name)
    if match is None:
        raise ValueError(f"{folder}: not a checkpoint folder name (stepNNNNNNNNN-epochNNNN-batchNNNNNN)")
    return CheckpointPosition(*map(int, match.groups()))
