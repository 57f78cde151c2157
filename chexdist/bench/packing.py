"""`chexdist bench pack`: images/s of the packer with 1 process vs N, on the same real files."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chexdist.bench.fixtures import find_images, make_nih_root
from chexdist.bench.timing import cpu_seconds, own_cpu_seconds
from chexdist.errors import ChexdistError


def pack_suite(images: str, count: int = 64, workers: int = 2, size: int = 512, fmt: str = "png", repeats: int = 3,
               **_: Any) -> Iterator[dict[str, Any]]:
    """Images/s of `chexdist pack` with 1 worker process vs `workers`, on the same real files.

    Each repeat packs with both, alternating which goes first; `ratio` = best N-worker rate / best
    1-worker rate, `ratio_runs` the ratio of each repeat's pair (their spread is the machine's noise).
    *_cpu_ms is CPU time per image of the process and its workers (best run), *_main_cpu_ms the
    parent's part of it: the serial share that caps scaling. On a busy machine the CPU times hold
    where the wall-clock ratio does not; load_avg (1 min, at the end) says how busy it was.
    """
    from chexdist.data.pack import PackSettings, pack_dataset

    if count < 1 or workers < 1 or repeats < 1:
        raise ChexdistError("--count, --workers and --repeats must be >= 1")
    files = find_images(images)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-pack-") as tmp:
        root = Path(tmp) / "nih"
        make_nih_root(files, count, root)
        settings = PackSettings(size=size, format=fmt, shard_size=max(1, count // (4 * workers)))
        rates: dict[int, list[float]] = {1: [], workers: []} if workers > 1 else {1: []}
        cpu: dict[int, list[float]] = {n: [] for n in rates}
        main: dict[int, list[float]] = {n: [] for n in rates}
        runs = 0
        for r in range(repeats):
            for n in (list(rates) if r % 2 == 0 else list(reversed(rates))):
                runs += 1
                start, cpu_start, own_start = time.perf_counter(), cpu_seconds(), own_cpu_seconds()
                pack_dataset(root, Path(tmp) / f"out-{runs}", settings, workers=n, progress=False)
                rates[n].append(count / (time.perf_counter() - start))
                cpu[n].append(1e3 * (cpu_seconds() - cpu_start) / count)
                main[n].append(1e3 * (own_cpu_seconds() - own_start) / count)
    yield {
        "bench": "pack",
        "format": fmt,
        "size": size,
        "images": count,
        "workers": workers,
        "repeats": repeats,
        "workers_1_img_s": round(max(rates[1]), 2),
        f"workers_{workers}_img_s": round(max(rates[workers]), 2),
        "ratio": round(max(rates[workers]) / max(rates[1]), 3),
        "ratio_runs": [round(b / a, 3) for a, b in zip(rates[1], rates[workers])],
        "workers_1_cpu_ms": round(min(cpu[1]), 2),
        f"workers_{workers}_cpu_ms": round(min(cpu[workers]), 2),
        f"workers_{workers}_main_cpu_ms": round(min(main[workers]), 2),
        "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2),
    }
