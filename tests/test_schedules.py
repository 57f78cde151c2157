"""Per-step schedule (sched.per_step): the lr is a function of the optimizer step alone (hand
formula), survives a state_dict round trip mid-way, and the config refuses what it cannot do.
The lr at every step of a mid-epoch resume vs the unbroken run is in test_trackers.py."""

from __future__ import annotations

import math

import pytest
import torch

from chexdist.config import load_config
from chexdist.errors import ChexdistError
from chexdist.training.optim import build_optimizer, build_scheduler, step_scheduler
from chexdist.training.schedules import is_per_step, set_total_steps


def schedule(*sets: str):
    cfg = load_config("tiny", overrides=["optim.lr=0.1", "sched.name=cosine", "sched.per_step=true", "sched.warmup_steps=3",
                                         "sched.min_lr=0.01", *sets])
    optimizer = build_optimizer(cfg.optim, torch.nn.Linear(2, 2))
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.train.epochs)
    set_total_steps(scheduler, epochs=2, batches_per_epoch=9, grad_accum=2)  # 5 steps per epoch
    return optimizer, scheduler


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def hand(step: int, base=0.1, floor=0.01, warmup=3, total=10) -> float:
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_warmup_then_cosine_matches_the_hand_formula():
    optimizer, scheduler = schedule()
    assert is_per_step(scheduler)
    assert lrs(optimizer, scheduler, 12) == pytest.approx([hand(k) for k in range(12)], rel=1e-12)
    optimizer, scheduler = schedule()
    lrs(optimizer, scheduler, 5)
    step_scheduler(scheduler, val_loss=1.0)  # the end-of-epoch step leaves a per-step schedule alone
    assert optimizer.param_groups[0]["lr"] == pytest.approx(hand(5))


def test_state_dict_round_trip_mid_way_continues_the_same_lrs():
    optimizer, scheduler = schedule()
    unbroken = lrs(optimizer, scheduler, 10)
    optimizer, scheduler = schedule()
    lrs(optimizer, scheduler, 4)
    saved_opt, saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = schedule()
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved)
    assert lrs(optimizer, scheduler, 6) == unbroken[4:]


def test_none_is_constant_after_warmup_and_refusals():
    optimizer, scheduler = schedule("sched.name=none", "sched.min_lr=0")
    assert lrs(optimizer, scheduler, 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    with pytest.raises(ChexdistError, match="sched.warmup_steps': needs sched.per_step=true"):
        load_config("tiny", overrides=["sched.warmup_steps=5"])
    with pytest.raises(ChexdistError, match="sched.per_step': works with sched.name=cosine or none, not plateau"):
        load_config("tiny", overrides=["sched.per_step=true"])
    with pytest.raises(ChexdistError, match="with sched.per_step=true use sched.warmup_steps"):
        load_config("tiny", overrides=["sched.name=cosine", "sched.per_step=true", "sched.warmup_epochs=1"])
