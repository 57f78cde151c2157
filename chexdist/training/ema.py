"""EMA of the weights (`train.ema_decay`) with timm's `ModelEmaV3`: updated after every optimizer
step from the unwrapped model (identical on every rank under DDP), validated each epoch beside the
raw weights, checkpointed in trainer_state.pt and exported when it scores better."""

from __future__ import annotations

import torch

from chexdist.config import Config


class WeightEma:
    """`ModelEmaV3` plus the step it was last updated at. Without warmup every update is
    ema = decay * ema + (1 - decay) * weights; with train.ema_warmup timm's ramp is used (decay 0 at
    the first step, then 1 - (1 + step)^(-2/3), capped at ema_decay)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        from timm.utils.model_ema import ModelEmaV3

        self.warmup = warmup
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        self.ema.module.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based)."""
        self.ema.update(model, step=step if self.warmup else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)


def build_ema(config: Config, model: torch.nn.Module) -> WeightEma | None:
    """The run's EMA (None when train.ema_decay is 0), started from the model's initial weights."""
    if not config.train.ema_decay:
        return None
    return WeightEma(model, config.train.ema_decay, config.train.ema_warmup)
