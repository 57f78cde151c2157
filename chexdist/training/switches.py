"""Speed and memory switches applied to the model before `accelerator.prepare`: gradient
checkpointing, SyncBatchNorm, channels_last, torch.compile; and the TF32 backend flag.

`train.compile` uses `nn.Module.compile(backend=train.compile_backend)`, which compiles the module's
call in place: the state dict keeps its names (no `_orig_mod.` prefix), so checkpoints, resume and
best.safetensors are the same with or without it, and DDP wraps the compiled module as any other.
"""

from __future__ import annotations

import os
import shutil

import torch

from chexdist.config import Config
from chexdist.errors import ChexdistError


def set_grad_checkpointing(model: torch.nn.Module) -> None:
    """timm's `set_grad_checkpointing`, or `memory_efficient` for torchvision's DenseNet layers."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return
    layers = [m for m in model.modules() if hasattr(m, "memory_efficient")]
    if not layers:
        raise ChexdistError(f"config key 'model.grad_checkpointing': {type(model).__name__} supports neither "
                            "set_grad_checkpointing nor memory_efficient; set it false")
    for layer in layers:
        layer.memory_efficient = True


def check_compiler(device: torch.device) -> None:
    """One line when torch.compile has no backend compiler here (C++ on CPU, Triton on GPUs)."""
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ChexdistError("config key 'train.compile': torch.compile needs Triton on GPUs and it is not installed; set it false")
        return
    cxx = os.environ.get("CXX", "c++")
    if not any(shutil.which(c) for c in (cxx, "g++", "clang++")):
        raise ChexdistError(f"config key 'train.compile': torch.compile on CPU needs a C++ compiler ({cxx} not found); "
                            "install g++ or set it false")


def check_backend(name: str) -> None:
    from torch._dynamo import list_backends

    if name not in list_backends(exclude_tags=()):
        raise ChexdistError(f"config key 'train.compile_backend': {name!r} is not a torch.compile backend here "
                            "(see torch._dynamo.list_backends(): inductor, aot_eager, eager, cudagraphs, ...)")


def check_switches(config: Config, device: torch.device, world_size: int) -> None:
    """The refusals, before any model is built."""
    if config.train.compile:
        check_backend(config.train.compile_backend)
        if config.train.compile_backend == "inductor":
            check_compiler(device)
    if config.model.sync_bn and world_size > 1 and device.type not in ("cuda", "xpu", "hpu"):
        raise ChexdistError(f"config key 'model.sync_bn': SyncBatchNorm runs on GPUs only, not {device.type}; set it false")


def apply_switches(model: torch.nn.Module, config: Config, world_size: int) -> torch.nn.Module:
    """Model switches except compile (which comes last, after the EMA copy: see `compile_model`)."""
    if config.model.grad_checkpointing:
        set_grad_checkpointing(model)
    if config.model.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    if config.train.compile:
        model.compile(backend=config.train.compile_backend)
    return model


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls on NVIDIA GPUs (float32 matmul precision 'high'; cuDNN convolutions
    already use TF32 by PyTorch's default)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
