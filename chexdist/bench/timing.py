"""CPU and wall-clock timing shared by the bench suites: CPU time holds on a busy machine where
wall-clock rates do not, so every suite reports both."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class Timing:
    images: int
    wall_s: float
    cpu_s: float
    main_cpu_s: float = 0.0  # steady passes: the consuming process's part of cpu_s (receiving, normalizing)

    @property
    def img_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1e3 * self.cpu_s / self.images


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers are joined at the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _live_children_cpu_seconds() -> float:
    """CPU time of this process's running children (persistent DataLoader workers), from /proc (Linux)."""
    me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def timed_steady(make: Callable[[int], Iterable[Any]]) -> Timing:
    """The second pass of a loader with persistent workers (`make(epoch)` starts pass `epoch`): no
    worker start-up, as in training after the first epoch. CPU time counts the live workers via /proc."""
    for _ in make(0):
        pass
    own, workers, wall = own_cpu_seconds(), _live_children_cpu_seconds(), time.perf_counter()
    images = 0
    for batch in make(1):
        images += len(batch[0])
    own = own_cpu_seconds() - own
    return Timing(images, time.perf_counter() - wall, own + _live_children_cpu_seconds() - workers, own)


def timed(make: Callable[[], Iterable[Any]]) -> Timing:
    """Drain one pass, worker start-up and shutdown included; CPU time makes it robust to busy machines."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    images = 0
    for batch in make():
        images += len(batch[0])
    return Timing(images, time.perf_counter() - wall, cpu_seconds() - cpu)


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.wall_s / t.images)


def main_cpu_ms(timings: list[Timing]) -> float:
    """The consuming process's CPU ms per image in the run with the least CPU time in all."""
    least = min(timings, key=lambda t: t.cpu_ms)
    return round(1e3 * least.main_cpu_s / least.images, 3)


def best_cpu(timings: list[Timing]) -> float:
    return min(t.cpu_ms for t in timings)


def compare(ours: list[Timing], baseline: list[Timing]) -> dict[str, float]:
    """Best wall-clock rates and CPU ms per image of two sets of repeats, and their ratios."""
    ours_img_s, baseline_img_s = best(ours).img_s, best(baseline).img_s
    ours_cpu, baseline_cpu = best_cpu(ours), best_cpu(baseline)
    return {
        "ours_img_s": round(ours_img_s, 1),
        "baseline_img_s": round(baseline_img_s, 1),
        "ratio": round(ours_img_s / baseline_img_s, 2),
        "ours_cpu_ms": round(ours_cpu, 3),
        "baseline_cpu_ms": round(baseline_cpu, 3),
        "cpu_ratio": round(baseline_cpu / ours_cpu, 2),
    }
