"""`chexdist bench tune`: what a Ray Tune trial costs over the same training run without Ray.

Ray is imported only when the suite runs; without the [tune] extra it is one line naming the extra.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chexdist.config import Config, apply_overrides, load_config
from chexdist.errors import ChexdistError


def tune_suite(shards: str | None = None, epochs: int = 2, max_batches: int = 20, **_: Any) -> Iterator[dict[str, Any]]:
    """(1) trials vs `engine.fit` of the same config in this (warmed-up) process: two identical trials
    one after the other in one reused worker (the first pays the worker's start and imports, the
    second is the steady state); (2) a 2-worker TorchTrainer trial vs `chexdist train --nproc 2`.
    Ray start-up is timed apart and excluded. Ray's and the engine's console output go to stderr so
    stdout holds only the JSON lines."""
    from chexdist.tuning.tuner import require

    require("ray", "chexdist bench tune")
    import ray

    from chexdist.training.engine import fit
    from chexdist.tuning.tuner import ray_init

    with tempfile.TemporaryDirectory(prefix="chexdist-bench-tune-") as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp)
        shards = shards or _bench_shards(root)
        fixed = [f"train.epochs={epochs}", f"data.max_train_batches={max_batches}", "eval.bootstrap=0"]
        config = load_config("tiny", overrides=[f"data.shards={shards}", *fixed])
        space = root / "space.yaml"
        space.write_text(f"optim.lr: {{grid: [{config.optim.lr}, {config.optim.lr}]}}\n")  # the plain run's config, twice

        fit(apply_overrides(config, {"train.epochs": 1, "data.max_train_batches": 1}), root / "warmup", progress=False)
        started = time.perf_counter()  # warm like the second trial: imports and first calls are paid
        fit(config, root / "plain", progress=False)
        plain_s = time.perf_counter() - started

        started = time.perf_counter()
        ray_init(None)
        ray_start_s = time.perf_counter() - started
        try:
            one = _timed_search(root, space, shards, fixed, "one", workers=1)
            ddp = _timed_search(root, space.with_name("ddp.yaml"), shards, fixed, "ddp", workers=2, lr=config.optim.lr)
        finally:
            ray.shutdown()
        nproc_s = _train_nproc2(root / "nproc2", shards, fixed)
        images, ddp_images = _run_images(root / "plain", config), _run_images(root / "nproc2", config)
        plain_loop_s, nproc_loop_s = _loop_seconds(root / "plain"), _loop_seconds(root / "nproc2")
    cold, warm = one["trial_s"]
    yield {"bench": "tune", "case": "trial_overhead", "epochs": epochs, "train_images": images, "plain_fit_s": round(plain_s, 2),
           "trial_warm_s": round(warm, 2), "trial_cold_s": round(cold, 2), "overhead_warm_s": round(warm - plain_s, 2),
           "overhead_cold_s": round(cold - plain_s, 2), "ratio": round(plain_s / warm, 3), "ratio_cold": round(plain_s / cold, 3),
           "tuner_fit_s": round(one["wall_s"], 2), "ray_start_s": round(ray_start_s, 2),
           "plain_loop_s": plain_loop_s, "trial_loop_s": one["loop_s"][-1]}
    (ddp_s,) = ddp["trial_s"]
    yield {"bench": "tune", "case": "ddp2_trial", "epochs": epochs, "workers": 2, "train_images": ddp_images,
           "trial_img_s": round(ddp_images / ddp_s, 2), "train_nproc2_img_s": round(ddp_images / nproc_s, 2),
           "ratio": round(nproc_s / ddp_s, 3), "trial_s": round(ddp_s, 2), "train_nproc2_s": round(nproc_s, 2),
           "trial_loop_s": ddp["loop_s"][-1], "train_nproc2_loop_s": nproc_loop_s}


def _train_nproc2(out: Path, shards: str, fixed: list[str]) -> float:
    """Seconds of `chexdist train --nproc 2` on CPU, run as the command a person types."""
    cmd = [sys.executable, "-m", "chexdist.cli", "train", "--nproc", "2", "--recipe", "tiny", "--shards", str(shards),
           "--out", str(out), "--no-progress", *[a for s in fixed for a in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise ChexdistError(f"bench tune: chexdist train --nproc 2 failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def _bench_shards(root: Path) -> str:
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    make_synthetic_nih(root / "nih", images=600, size=96, seed=0)
    pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=72, shard_size=128), workers=1, progress=False)
    return str(root / "shards")


def _run_images(run: Path, config: Config) -> int:
    """Training images a finished run consumed: optimizer steps x batch x processes (no accumulation)."""
    from chexdist.runs import read_metrics

    last = read_metrics(run)[-1]
    return last["step"] * config.data.batch_size * config.train.grad_accum * last["world_size"]


def _timed_search(root: Path, space: Path, shards: str, fixed: list[str], name: str, workers: int,
                  lr: float | None = None) -> dict[str, Any]:
    """Run a search of `space` (one trial at a time); per trial its wall time inside Ray and loop time."""
    from chexdist.tuning.options import TuneOptions
    from chexdist.tuning.results import error_line, wall_seconds
    from chexdist.tuning.trial import RUN_DIR
    from chexdist.tuning.tuner import build_tuner, plan_search

    if lr is not None:
        space.write_text(f"optim.lr: {{choice: [{lr}]}}\n")
    options = TuneOptions(shards=str(shards), space=str(space), recipe="tiny", overrides=list(fixed), storage=str(root / "tune"),
                          name=name, trials=1, scheduler="fifo", max_concurrent=1, workers_per_trial=workers)
    plan = plan_search(options)
    started = time.perf_counter()
    grid = build_tuner(options, plan).fit()
    wall = time.perf_counter() - started
    results = sorted(grid, key=lambda r: Path(r.path).name)
    for result in results:
        if result.error is not None:
            raise ChexdistError(f"bench tune: a {name} trial failed: {error_line(result.error)}")
    return {"wall_s": wall, "trial_s": [wall_seconds(r) for r in results],
            "loop_s": [_loop_seconds(Path(r.path) / RUN_DIR) for r in results]}


def _loop_seconds(run: Path) -> float:
    """Training-loop seconds summed over the run's epochs (metrics.jsonl `seconds`)."""
    from chexdist.runs import read_metrics

    return round(sum(r["seconds"] for r in read_metrics(run)), 3)
