"""`chexdist bench NAME`: performance suites, each printing one JSON object per result line.

A suite is a function in SUITES taking keyword options and yielding result dicts; `run_suite`
prints them as they come, so a long suite shows progress and a killed run keeps its finished lines.
Results are ratios measured within one run (the Performance contract), plus the raw figures.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from chexdist.data import build_train_loader, decode_gray
from chexdist.errors import ChexdistError
from chexdist.labels import NUM_LABELS
from chexdist.nih import IMAGE_SUFFIXES
from chexdist.shardformat import iter_tar, load_manifest, shard_urls
from chexdist.transforms import build_transform

_CSV_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]


# ---------------------------------------------------------------- loader suite


def find_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ChexdistError(f"{folder}: --images is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ChexdistError(f"{folder}: no .png/.jpg images to benchmark with")
    return files


def make_nih_root(files: list[Path], count: int, root: Path) -> list[Path]:
    """An NIH-format folder of `count` images (the given files cycled, as symlinks) with its CSV.

    Returns the image paths in CSV order; the baseline reads exactly these files.
    """
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    sizes: dict[Path, tuple[int, int]] = {}
    paths, rows = [], []
    for i in range(count):
        source = files[i % len(files)].resolve()
        if source not in sizes:
            with Image.open(source) as im:
                sizes[source] = im.size
        name = f"{i + 1:08d}_000{source.suffix.lower()}"
        (images / name).symlink_to(source)
        paths.append(images / name)
        width, height = sizes[source]
        rows.append([name, "No Finding", 0, i + 1, 50, "M", "PA", width, height, 0.143, 0.143])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_HEADER)
        writer.writerows(rows)
    return paths


class FolderDataset(Dataset):
    """The baseline: one image file per sample, read and decoded per item (the usual NIH setup)."""

    def __init__(self, paths: list[Path], transform: Callable[[torch.Tensor], torch.Tensor]):
        self.paths, self.transform = [str(p) for p in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(self.paths[i], "rb") as f:
            image = decode_gray(f.read())
        return self.transform(image), torch.zeros(NUM_LABELS)


@dataclass
class Timing:
    images: int
    wall_s: float
    cpu_s: float

    @property
    def img_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1e3 * self.cpu_s / self.images


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers are joined at the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(make: Callable[[], Iterable[Any]]) -> Timing:
    """Drain one pass, worker start-up and shutdown included; CPU time makes it robust to busy machines."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    images = 0
    for batch in make():
        images += len(batch[0])
    return Timing(images, time.perf_counter() - wall, _cpu_seconds() - cpu)


def _as_engine_consumes(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield loader.normalize(images), labels


def _decode_only(shard_dir: Path, transform: Callable[[torch.Tensor], torch.Tensor]) -> Timing:
    """Bare decode + transform of the shard images on one thread, bytes already in memory."""
    blobs = [
        next(sample[k] for k in ("png", "jpg", "jpeg") if k in sample)
        for url in shard_urls(shard_dir, "train")
        for sample in iter_tar(url)
    ]
    return _timed(lambda: _decode_each(blobs, transform))


def _decode_each(blobs: list[bytes], transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[list[torch.Tensor]]]:
    for blob in blobs:
        yield ([transform(decode_gray(blob))],)


def _best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.wall_s / t.images)


def _best_cpu(timings: list[Timing]) -> float:
    return min(t.cpu_ms for t in timings)


def loader_suite(
    images: str | os.PathLike,
    count: int = 1024,
    workers: int = 2,
    batch_size: int = 32,
    formats: tuple[str, ...] = ("png", "jpg"),
    size: int = 512,
    image_size: int = 224,
    eval_resize: int = 256,
    quality: int = 95,
    shard_size: int = 1000,
    repeats: int = 2,
    work_dir: str | os.PathLike | None = None,
) -> Iterator[dict[str, Any]]:
    """Shard stream vs per-file PNG folder: same images, eval transform, workers and batch size.

    Packs `count` images from `images` (cycled if fewer) into `size`-px shards per format. Each
    measurement runs `repeats` times, interleaved, best kept, worker start-up included:
    ours = build_train_loader with `workers`; baseline = Dataset + DataLoader over the original files
    (same decoder and transform). *_img_s is wall-clock throughput; *_cpu_ms is CPU time per image of
    the process and its workers, which a busy machine does not distort (cpu_ratio = per-core
    speed-up). decode_only = bare decode + transform of the shard bytes in memory on one thread;
    stream_1proc = ours without workers on one thread; stream_overhead = their CPU-time ratio - 1,
    the cost of tar reading, shuffling and collation. Ours is what the engine consumes: uint8 batches
    from the workers, normalized by the consuming process (on a GPU that step runs on the device).
    """
    from chexdist.pack import PackSettings, pack_dataset

    if count < 1 or workers < 0 or batch_size < 1 or repeats < 1:
        raise ChexdistError("--count, --batch-size and --repeats must be >= 1 and --workers >= 0")
    files = find_images(images)
    transform = build_transform("none", image_size=image_size, eval_resize=eval_resize, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-", dir=work_dir) as tmp:
        root = Path(tmp) / "nih"
        paths = make_nih_root(files, count, root)
        try:
            for fmt in formats:
                shards = Path(tmp) / f"shards-{fmt}"
                settings = PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=size, format=fmt,
                                        quality=quality, shard_size=shard_size)
                pack_dataset(root, shards, settings, workers=max(1, workers), progress=False)
                manifest = load_manifest(shards)
                ours, single, baseline, bare = [], [], [], []
                for _ in range(repeats):
                    ours.append(_timed(lambda: _as_engine_consumes(build_train_loader(
                        shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
                        normalize_in_loader=False)[0])))
                    baseline.append(_timed(lambda: DataLoader(
                        FolderDataset(paths, transform), batch_size=batch_size, shuffle=True, num_workers=workers)))
                    single.append(_timed(lambda: _as_engine_consumes(build_train_loader(
                        shards, batch_size, transform, 0, 1, 0, seed=0, epoch=0, manifest=manifest,
                        normalize_in_loader=False)[0])))
                    bare.append(_decode_only(shards, transform))
                ours_img_s, baseline_img_s = _best(ours).img_s, _best(baseline).img_s
                ours_cpu, baseline_cpu = _best_cpu(ours), _best_cpu(baseline)
                single_cpu, bare_cpu = _best_cpu(single), _best_cpu(bare)
                yield {
                    "bench": "loader",
                    "format": fmt,
                    "ours_img_s": round(ours_img_s, 1),
                    "baseline_img_s": round(baseline_img_s, 1),
                    "ratio": round(ours_img_s / baseline_img_s, 2),
                    "workers": workers,
                    "images": count,
                    "batch_size": batch_size,
                    "ours_cpu_ms": round(ours_cpu, 3),
                    "baseline_cpu_ms": round(baseline_cpu, 3),
                    "cpu_ratio": round(baseline_cpu / ours_cpu, 2),
                    "decode_only_img_s": round(_best(bare).img_s, 1),
                    "decode_only_cpu_ms": round(bare_cpu, 3),
                    "stream_1proc_img_s": round(_best(single).img_s, 1),
                    "stream_1proc_cpu_ms": round(single_cpu, 3),
                    "stream_overhead": round(single_cpu / bare_cpu - 1, 3),
                    "shard_px": size,
                    "shard_bytes": sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]),
                    "cpus": os.cpu_count(),
                }
        finally:
            torch.set_num_threads(threads)


def pack_suite(images: str, count: int = 64, workers: int = 2, size: int = 512, fmt: str = "png", **_: Any) -> Iterator[dict[str, Any]]:
    """Images/s of `chexdist pack` with 1 worker process vs `workers`, on the same real files."""
    from chexdist.pack import PackSettings, pack_dataset

    files = find_images(images)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-pack-") as tmp:
        root = Path(tmp) / "nih"
        make_nih_root(files, count, root)
        settings = PackSettings(size=size, format=fmt, shard_size=max(1, count // (4 * workers)))
        rates = {}
        for n in (1, workers):
            start = time.perf_counter()
            pack_dataset(root, Path(tmp) / f"out-{n}", settings, workers=n, progress=False)
            rates[n] = count / (time.perf_counter() - start)
    yield {
        "bench": "pack",
        "format": fmt,
        "size": size,
        "images": count,
        "workers": workers,
        "workers_1_img_s": round(rates[1], 2),
        f"workers_{workers}_img_s": round(rates[workers], 2),
        "ratio": round(rates[workers] / rates[1], 3),
        "cpus": os.cpu_count(),
    }


def train_suite(model: str = "resnet18", image_size: int = 128, batch_size: int = 16, steps: int = 20,
                precision: str = "no", repeats: int = 6, **_: Any) -> Iterator[dict[str, Any]]:
    """`engine.train_epoch` vs a bare PyTorch loop: same model init, batches, optimizer, loss and
    precision, alternated `repeats` times (each goes first half the time); best of each. Batches are in memory so only the loops differ."""
    import copy

    from accelerate import Accelerator

    from chexdist.config import load_config
    from chexdist.engine import Checkpointer, StopFlag, TrainState, train_epoch
    from chexdist.losses import build_loss
    from chexdist.models import create_model
    from chexdist.optim import build_optimizer

    accelerator = Accelerator(mixed_precision=precision)
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
        state = TrainState()
        unused = Checkpointer(accelerator, Path(tempfile.gettempdir()), state, scheduler=None, keep=1)  # no stop, no step saves
        start = time.perf_counter()
        train_epoch(engine_model, engine_opt, criterion, accelerator, config, feed, len(feed), state, StopFlag(), unused)
        _sync(device)
        return time.perf_counter() - start

    def run_bare() -> float:
        bare_model.train()
        start = time.perf_counter()
        for images, targets in feed:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = criterion(bare_model(images), targets)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(bare_opt)
                scaler.update()
            else:
                loss.backward()
                bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


SUITES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {"loader": loader_suite, "pack": pack_suite, "train": train_suite}


def run_suite(name: str, out=sys.stdout, **options: Any) -> list[dict[str, Any]]:
    """Run suite `name`, printing each result as one JSON line as soon as it is measured."""
    if name not in SUITES:
        raise ChexdistError(f"unknown bench {name!r}; choose one of {', '.join(SUITES)}")
    results = []
    for result in SUITES[name](**options):
        print(json.dumps(result), file=out, flush=True)
        results.append(result)
    return results
