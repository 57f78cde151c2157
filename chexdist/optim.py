"""Optimizer and per-epoch LR scheduler from the `optim` and `sched` config sections."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau, SequentialLR, StepLR

from chexdist.config import OptimConfig, SchedConfig
from chexdist.errors import ChexdistError


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise ChexdistError(f"config key 'optim.name': {cfg.name!r} is not one of adam, adamw, sgd")


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """Stepped once per epoch (plateau with the epoch's val loss, which every rank computes from the
    same gathered predictions, so all ranks take the same decision)."""
    if cfg.name == "plateau":
        if cfg.warmup_epochs:
            raise ChexdistError("config key 'sched.warmup_epochs' is not supported with sched.name=plateau; use cosine or step")
        return ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr)
    if cfg.name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, epochs - cfg.warmup_epochs), eta_min=cfg.min_lr)
    elif cfg.name == "step":
        main = StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.factor)
    elif cfg.name == "none":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=1)
    else:
        raise ChexdistError(f"config key 'sched.name': {cfg.name!r} is not one of plateau, cosine, step, none")
    if not cfg.warmup_epochs:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / (cfg.warmup_epochs + 1), total_iters=cfg.warmup_epochs)
    return SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])


def step_scheduler(scheduler, val_loss: float) -> None:
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()
