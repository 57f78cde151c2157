"""Optimizer and per-epoch LR scheduler from the `optim` and `sched` config sections."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau, SequentialLR, StepLR

from chexdist.config import OptimConfig, SchedConfig
from chexdist.errors import ChexdistError


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module | Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer at `lr` (default cfg.lr; the engine passes the batch-scaled lr).

    Given a model, weight decay skips 1-d parameters (norm weights, biases) and the model's
    `no_weight_decay()` names (ViT's pos_embed, cls_token), as timm's trainer does: decaying a
    BatchNorm scale towards 0 is not regularization. Given bare parameters, all are decayed.
    """
    lr = cfg.lr if lr is None else lr
    if isinstance(model, torch.nn.Module):
        from timm.optim import param_groups_weight_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        params = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    else:
        params = [p for p in model if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise ChexdistError(f"config key 'optim.name': {cfg.name!r} is not one of adam, adamw, sgd")


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """Per-epoch schedule (the config refuses warmup with plateau). Stepped once per epoch (plateau with the epoch's val loss, which every rank computes from the
    same gathered predictions, so all ranks take the same decision). sched.per_step: see schedules."""
    if cfg.per_step:
        from chexdist.training.schedules import build_step_scheduler

        return build_step_scheduler(cfg, optimizer)
    if cfg.name == "plateau":
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
    """The end-of-epoch step (per-step schedules step in the loop instead)."""
    from chexdist.training.schedules import is_per_step

    if is_per_step(scheduler):
        return
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()
