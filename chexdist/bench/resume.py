"""`chexdist bench resume`: restart-to-first-batch of a resumed train loader, skipping vs `start_batch`."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chexdist.bench.fixtures import pack_real
from chexdist.bench.timing import Timing, best, cpu_seconds
from chexdist.data.loader import build_train_loader
from chexdist.data.transforms import build_transform
from chexdist.errors import ChexdistError


def resume_suite(images: str | os.PathLike, count: int = 512, workers: int = 2, batch_size: int = 32, size: int = 512,
                 fractions: tuple[float, ...] = (0.1, 0.9), repeats: int = 2, **_: Any) -> Iterator[dict[str, Any]]:
    """Restart-to-first-batch of a train loader resumed at `fractions` of an epoch: before (the loader
    starts at batch 0 and the first k batches are decoded and discarded, as the engine did) vs after
    (`start_batch=k`: the readers start at the first sample batch k needs and decode nothing they skip).

    The first batch is the one the resumed run's first optimizer step uses; both loaders yield the
    same batch (checked). Train augmentation ("dannynet", 224 px) on `count` real images packed at
    `size` px. Best of `repeats`; CPU time is that of the process and its workers.
    """
    from chexdist.data.pack import PackSettings

    transform = build_transform("dannynet", image_size=224, train=True)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-resume-") as tmp:
        shards = pack_real(images, count, Path(tmp), PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=size))
        num_batches = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0)[1]
        for fraction in fractions:
            k = min(num_batches - 1, int(fraction * num_batches))
            times: dict[str, list[Timing]] = {"skip": [], "start": []}
            first: dict[str, torch.Tensor] = {}
            for _ in range(repeats):
                for how in ("skip", "start"):
                    cpu, wall = cpu_seconds(), time.perf_counter()
                    loader, _ = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0,
                                                   start_batch=k if how == "start" else 0, normalize_in_loader=False)
                    batches = iter(loader)
                    for _ in range(0 if how == "start" else k):
                        next(batches)
                    first[how] = next(batches)[0]
                    seconds = time.perf_counter() - wall
                    del batches, loader  # joins the workers, so their CPU time is counted
                    times[how].append(Timing(1, seconds, cpu_seconds() - cpu))
            if not torch.equal(first["skip"], first["start"]):
                raise ChexdistError("resume bench: start_batch gave another batch than skipping; the loader is broken")
            before, after = best(times["skip"]), best(times["start"])
            yield {
                "bench": "resume",
                "fraction": fraction,
                "start_batch": k,
                "num_batches": num_batches,
                "batch_size": batch_size,
                "workers": workers,
                "before_s": round(before.wall_s, 3),
                "after_s": round(after.wall_s, 3),
                "speedup": round(before.wall_s / after.wall_s, 2),
                "before_cpu_s": round(min(t.cpu_s for t in times["skip"]), 3),
                "after_cpu_s": round(min(t.cpu_s for t in times["start"]), 3),
                "shard_px": size,
                "cpus": os.cpu_count(),
            }
