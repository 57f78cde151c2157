"""Per-step LR schedules (`sched.per_step`): the lr is a function of the optimizer step alone, so a
run resumed mid-epoch takes exactly the lr of the unbroken run at every step. Built on torch's
`LambdaLR`, whose state (the step and this module's `StepFactor`) is saved with the checkpoint."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from chexdist.config import SchedConfig


class StepFactor:
    """lr / base lr after `step` optimizer steps: linear warmup from 1/(warmup+1) to 1 over
    `warmup_steps`, then cosine from 1 to `min_ratio` over the rest of `total_steps` (constant 1 for
    kind none). A callable object, so LambdaLR's state_dict keeps its fields."""

    def __init__(self, kind: str, warmup_steps: int, min_ratio: float, total_steps: int = 0):
        self.kind, self.warmup_steps, self.min_ratio, self.total_steps = kind, warmup_steps, min_ratio, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "none":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_step_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The per-step scheduler; its length is set by `set_total_steps` once the loader is built (the
    lr at step 0 does not depend on it)."""
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, StepFactor(cfg.name, cfg.warmup_steps, cfg.min_lr / base_lr))


def is_per_step(scheduler) -> bool:
    return isinstance(scheduler, LambdaLR) and isinstance(scheduler.lr_lambdas[0], StepFactor)


def set_total_steps(scheduler, epochs: int, batches_per_epoch: int, grad_accum: int) -> None:
    """Cosine length = every optimizer step of the run (an epoch's last group may be partial)."""
    total = epochs * math.ceil(batches_per_epoch / grad_accum)
    for factor in scheduler.lr_lambdas:
        factor.total_steps = total
