"""Checkpoints have one owner: the loop position (`TrainState`), how checkpoint folders are named,
listed and parsed, and saving/resuming them (`Checkpointer`). The tuner asks this module."""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from chexdist.errors import ChexdistError


# What an epoch's data plan and step grouping depend on besides the config: stored in
# trainer_state.pt, compared on --resume (TrainState field -> how the user sets it).
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


class Checkpointer:
    """Accelerate `save_state` (model, optimizer, scaler, RNG per rank) plus our loop state and
    scheduler in `trainer_state.pt`, all loadable with weights_only=True. A checkpoint is written
    under a temp name and renamed into place when complete; the last `keep` are kept."""

    STATE_FILE = "trainer_state.pt"

    def __init__(self, accelerator, out: Path, state: TrainState, scheduler, keep: int, extra: dict[str, Any] | None = None):
        """`extra`: name -> object with state_dict/load_state_dict of tensors (the EMA), saved beside the loop state."""
        self.accelerator, self.out, self.state, self.scheduler, self.keep = accelerator, out, state, scheduler, keep
        self.extra = extra or {}

    def save(self) -> Path:
        acc = self.accelerator
        final = self.out / "checkpoints" / checkpoint_name(self.state)
        temp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process and temp.exists():
            shutil.rmtree(temp)
        acc.wait_for_everyone()
        acc.save_state(str(temp), safe_serialization=True)
        if acc.is_main_process:
            torch.save({"train_state": self.state.state_dict(), "scheduler": self.scheduler.state_dict(),
                        **{name: obj.state_dict() for name, obj in self.extra.items()}}, temp / self.STATE_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
            for old in list_checkpoints(self.out)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @classmethod
    def check_complete(cls, path: Path) -> None:
        if not (path / cls.STATE_FILE).is_file():
            raise ChexdistError(f"{path}: not a complete chexdist checkpoint (no {cls.STATE_FILE})")

    def load(self, path: Path, seed: int) -> None:
        """Restore `path` into a run whose state holds the current shape (SHAPE_KEYS).

        Another shape is allowed at an epoch boundary and said in one line; mid-epoch it is refused
        (the rest of the epoch was planned for the old shape). RNG states are restored only on the
        same world size with every rank's file present; otherwise each rank is reseeded from
        (seed, epoch, rank) and that is said in one line, instead of Accelerate's silent skip.
        """
        acc = self.accelerator
        self.check_complete(path)
        saved = torch.load(path / self.STATE_FILE, map_location="cpu", weights_only=True)
        now = {k: getattr(self.state, k) for k in SHAPE_KEYS}
        was = {k: saved["train_state"].get(k, 0) for k in SHAPE_KEYS}
        changed = {k: (was[k], now[k]) for k in SHAPE_KEYS if was[k] and was[k] != now[k]}
        mid_epoch = saved["train_state"].get("batch", 0) > 0
        if changed and mid_epoch:
            raise ChexdistError(_shape_refusal(path, saved["train_state"], changed))
        if changed:
            acc.print(f"resuming at an epoch boundary on another shape ({_describe(changed)}): the next epochs are planned for the new one")
        elif mid_epoch and not was["world_size"]:
            acc.print(f"{path}: checkpoint predates shape recording; assuming it was saved on this shape")
        rng_files = sorted(path.glob("random_states_*.pkl"))
        acc.load_state(str(path))
        self.state.load_state_dict(saved["train_state"])
        self.scheduler.load_state_dict(saved["scheduler"])
        for name, obj in self.extra.items():
            if name not in saved:
                raise ChexdistError(f"{path}: holds no {name} state (saved without it); resume with the run's settings")
            obj.load_state_dict(saved[name])
        expected = [path / f"random_states_{r}.pkl" for r in range(acc.num_processes)]
        if not all(f in rng_files for f in expected) or len(rng_files) != acc.num_processes:
            from accelerate.utils import set_seed

            set_seed(int(np.random.SeedSequence([seed, self.state.epoch, acc.process_index]).generate_state(1)[0]))
            acc.print(
                f"RNG states not restored: {path.name} holds {len(rng_files)} rank state(s), this run has "
                f"{acc.num_processes} process(es); each rank reseeded from (train.seed, epoch, rank)"
            )
        for key, value in now.items():
            setattr(self.state, key, value)


def _describe(changed: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{SHAPE_KEYS[k]} {old} -> {new}" for k, (old, new) in changed.items())


def _shape_refusal(path: Path, saved: dict[str, Any], changed: dict[str, tuple[int, int]]) -> str:
    old = {k: saved[k] for k in SHAPE_KEYS}
    return (
        f"{path}: saved mid-epoch (epoch {saved['epoch'] + 1}, batch {saved['batch']}) on another shape "
        f"({_describe(changed)}); the rest of that epoch is planned for the old shape, so resume it with "
        f"{old['world_size']} process(es) and data.num_workers={old['num_workers']} (per-process batch "
        f"{old['batch_size']}, train.grad_accum {old['grad_accum']}); from the next epoch-boundary checkpoint on, "
        "any shape can resume"
    )


def resolve_resume(out: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint to continue from: `latest` (or True) must find one, `auto` starts fresh when
    there is none (SLURM requeue scripts pass it on every start), anything else is a folder."""
    if not resume:
        return None
    if resume is True or resume in ("latest", "auto"):
        found = list_checkpoints(out)
        if found:
            return found[-1]
        if resume == "auto":
            return None
        raise ChexdistError(f"{out}: --resume found no checkpoint under {out / 'checkpoints'}; use --resume auto to start fresh when there is none")
    path = Path(resume)
    if not path.is_dir():
        raise ChexdistError(f"--resume {path}: not a checkpoint folder")
    Checkpointer.check_complete(path)
    return path
