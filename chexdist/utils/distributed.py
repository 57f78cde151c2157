"""The one place an Accelerate `Accelerator` is built: training, evaluation, Ray Train trials and the
benchmarks run on the same process-group set-up and precision rules."""

from __future__ import annotations

import os

from chexdist.errors import ChexdistError


def make_accelerator(precision: str | None = None, *, cpu: bool | None = None, **kwargs):
    """An Accelerator with `precision` ("no", "bf16", "fp16"; None = the launcher's --mixed_precision,
    the environment or the accelerate config). `cpu=True` also sets ACCELERATE_USE_CPU, which
    Accelerate needs to take the multi-CPU path on a process group that is already set up (Ray Train).
    A precision other than the one this process already runs Accelerate with is refused in one line."""
    from accelerate import Accelerator

    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=bool(cpu), **kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise ChexdistError(
            f"config key 'train.precision': {precision} differs from the precision this process already runs Accelerate "
            "with; run it in a new process"
        ) from None
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and launcher and launcher.lower() != precision:
        accelerator.print(
            f"precision {precision} from train.precision; the launcher's --mixed_precision {launcher.lower()} is not used "
            "(set train.precision=auto to use it)"
        )
    return accelerator
