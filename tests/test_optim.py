"""Optimizers and per-epoch schedulers built from config sections."""

from __future__ import annotations

import pytest
import torch

from chexdist.config import load_config
from chexdist.errors import ChexdistError
from chexdist.training.optim import build_optimizer, build_scheduler, step_scheduler


def lrs(overrides: list[str], val_losses: list[float]) -> list[float]:
    cfg = load_config("tiny", overrides=overrides)
    optimizer = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.train.epochs)
    out = []
    for loss in val_losses:
        optimizer.step()
        step_scheduler(scheduler, loss)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_plateau_divides_lr_by_ten_after_patience():
    got = lrs(["optim.lr=1.0", "sched.name=plateau", "sched.patience=1", "sched.factor=0.1"], [1.0, 0.9, 0.9, 0.9, 0.9])
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1])


def test_cosine_step_and_warmup():
    cosine = lrs(["optim.lr=1.0", "sched.name=cosine", "train.epochs=4"], [0] * 4)
    assert cosine == pytest.approx([0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    step = lrs(["optim.lr=1.0", "sched.name=step", "sched.step_size=2", "sched.factor=0.5"], [0] * 4)
    assert step == pytest.approx([1.0, 0.5, 0.5, 0.25])
    warm = lrs(["optim.lr=1.0", "sched.name=none", "sched.warmup_epochs=2"], [0] * 4)
    assert warm == pytest.approx([2 / 3, 1.0, 1.0, 1.0])


def test_optimizer_kinds_take_their_keys():
    cfg = load_config("tiny", overrides=["optim.name=sgd", "optim.momentum=0.8", "optim.nesterov=true", "optim.weight_decay=1e-4"])
    sgd = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"]
    cfg = load_config("dannynet")
    adamw = build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 5e-5 and adamw.defaults["weight_decay"] == 1e-5
    with pytest.raises(ChexdistError, match="warmup_epochs"):
        load_config("tiny", overrides=["sched.name=plateau", "sched.warmup_epochs=1"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_skips_batchnorm_weights_and_biases(name):
    """With zero gradients an optimizer step is pure weight decay: conv/linear weights shrink by
    (1 - lr * wd) (AdamW) or lr * wd * w (SGD); BatchNorm weights and every bias stay put."""
    from chexdist.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet")
    cfg = load_config("tiny", overrides=[f"optim.name={name}", "optim.lr=0.1", "optim.weight_decay=0.5", "optim.momentum=0"])
    optimizer = build_optimizer(cfg.optim, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)}
    assert norms, "test_resnet has BatchNorm layers"
    for n, p in model.named_parameters():
        if n in norms or n.endswith(".bias"):
            assert torch.equal(p, before[n]), f"{n} was decayed"
        else:
            assert torch.allclose(p, before[n] * 0.95, atol=1e-7), f"{n} was not decayed"
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.5]
