"""`chexdist bench train`: the engine's training loop vs a bare PyTorch loop on the same batches."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chexdist.utils.distributed import make_accelerator

SWITCHES_DEFAULT = ("channels_last", "grad_checkpointing", "compile")


def train_suite(model: str = "resnet18", image_size: int = 128, batch_size: int = 16, steps: int = 20,
                precision: str = "no", repeats: int = 6, switches: tuple[str, ...] = tuple(SWITCHES_DEFAULT),
                **_: Any) -> Iterator[dict[str, Any]]:
    """`engine.train_epoch` vs a bare PyTorch loop: same model init, batches, optimizer, loss and
    precision, alternated `repeats` times (each goes first half the time); best of each. Batches are in memory so only the loops differ.
    Then each of `switches` vs the default engine loop (`switch_results`)."""
    import copy

    from chexdist.config import load_config
    from chexdist.training.losses import build_loss
    from chexdist.models.factory import create_model
    from chexdist.training.optim import build_optimizer

    accelerator = make_accelerator(precision)
    device = accelerator.device
    config = load_config("tiny", overrides=[f"model.name={model}", f"data.batch_size={batch_size}", f"train.precision={precision}"])
    torch.manual_seed(0)
    batches = [(torch.randn(batch_size, 3, image_size, image_size), (torch.rand(batch_size, 14) < 0.2).float()) for _ in range(4)]
    feed = [batches[i % len(batches)] for i in range(steps)]
    initial = create_model(model)
    criterion = build_loss("bce")

    engine_model = copy.deepcopy(initial)
    engine_opt = build_optimizer(config.optim, engine_model.parameters())
    engine_model, engine_opt = accelerator.prepare(engine_model, engine_opt)
    bare_model = copy.deepcopy(initial).to(device)
    bare_opt = build_optimizer(config.optim, bare_model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def run_engine() -> float:
        return _engine_seconds(engine_model, engine_opt, criterion, accelerator, config, feed)

    def run_bare() -> float:
        return _bare_seconds(bare_model, bare_opt, criterion, feed, device, dtype, scaler)

    run_engine(), run_bare()  # warm-up: allocator, kernels, optimizer state
    engine_s, bare_s = [], []
    for r in range(repeats):  # alternate who goes first: caches and clocks favour the second run
        if r % 2:
            bare_s.append(run_bare())
            engine_s.append(run_engine())
        else:
            engine_s.append(run_engine())
            bare_s.append(run_bare())
    result = {
        "bench": "train",
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "precision": precision,
        "device": device.type,
        "engine_img_s": round(steps * batch_size / min(engine_s), 2),
        "bare_img_s": round(steps * batch_size / min(bare_s), 2),
        "ratio": round(min(bare_s) / min(engine_s), 3),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name()
    yield result
    if switches:
        yield from switch_results(initial, criterion, accelerator, config, feed, switches, repeats, result)


SWITCHES = {"channels_last": "train.channels_last=true", "grad_checkpointing": "model.grad_checkpointing=true",
            "compile": "train.compile=true"}


def switch_results(initial, criterion, accelerator, config, feed: list, switches, repeats: int,
                   base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each switch vs the default engine loop on the same model init, batches and precision, in this
    run: one line per switch, ratio = default seconds / switch seconds (> 1: the switch is faster);
    on a GPU also each one's peak memory. Timings alternate (default first half the time)."""
    import copy

    from chexdist.config import apply_overrides
    from chexdist.training.optim import build_optimizer
    from chexdist.training.switches import apply_switches, check_switches, compile_model

    device = accelerator.device
    variants = {}
    for name in ("default", *switches):
        cfg = config if name == "default" else apply_overrides(config, [SWITCHES[name]])
        check_switches(cfg, device, 1)
        model = apply_switches(copy.deepcopy(initial), cfg, 1)
        model, optimizer = accelerator.prepare(model, build_optimizer(cfg.optim, model.parameters()))
        compile_model(accelerator.unwrap_model(model), cfg)
        variants[name] = (model, optimizer, cfg)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    peak: dict[str, float] = {}
    for name, (model, optimizer, cfg) in variants.items():  # warm-up (compiles)
        _engine_seconds(model, optimizer, criterion, accelerator, cfg, feed)
    for r in range(repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            model, optimizer, cfg = variants[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[name].append(_engine_seconds(model, optimizer, criterion, accelerator, cfg, feed))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    images = len(feed) * base["batch_size"]
    for name in switches:
        line = {"bench": "train_switch", "switch": name, **{k: base[k] for k in ("model", "image_size", "batch_size", "steps",
                                                                                 "precision", "device")},
                "default_img_s": round(images / min(seconds["default"]), 2), "switch_img_s": round(images / min(seconds[name]), 2),
                "ratio": round(min(seconds["default"]) / min(seconds[name]), 3)}
        if peak:
            line.update(default_peak_memory_gib=round(peak["default"], 2), switch_peak_memory_gib=round(peak[name], 2))
        yield line


def _engine_seconds(model, optimizer, criterion, accelerator, config, feed: list) -> float:
    """Seconds of one `train_epoch` over `feed` (no stop, no step checkpoints)."""
    from chexdist.training.checkpoint import Checkpointer, TrainState
    from chexdist.training.engine import train_epoch
    from chexdist.utils.stopsignals import StopFlag

    state = TrainState()
    unused = Checkpointer(accelerator, Path(tempfile.gettempdir()), state, scheduler=None, keep=1)  # no stop, no step saves
    start = time.perf_counter()
    train_epoch(model, optimizer, criterion, accelerator, config, feed, len(feed), state, StopFlag(), unused)
    _sync(accelerator.device)
    return time.perf_counter() - start


def _bare_seconds(model, optimizer, criterion, feed: list, device: torch.device, dtype, scaler) -> float:
    """Seconds of the same steps as a plain PyTorch loop (autocast and GradScaler as the engine uses them)."""
    model.train()
    start = time.perf_counter()
    for images, targets in feed:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(images), targets)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the steps are done, not when they are queued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
