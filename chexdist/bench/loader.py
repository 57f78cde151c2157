"""`chexdist bench NAME`: performance suites, each printing one JSON object per result line.

A suite is a function in SUITES taking keyword options and yielding result dicts; `run_suite`
prints them as they come, so a long suite shows progress and a killed run keeps its finished lines.
Results are ratios measured within one run (the Performance contract), plus the raw figures.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import resource
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import torch
from torch.utils.data import DataLoader, Dataset

from chexdist.data.loader import (
    collate_images,
    seed_words,
    seeded,
    build_train_loader,
    decode_gray,
    image_bytes,
    parse_labels,
)
from chexdist.errors import ChexdistError
from chexdist.utils.distributed import make_accelerator
from chexdist.utils.fileio import dumps_json
from chexdist.labels import NUM_LABELS
from chexdist.data.nih import DATA_ENTRY_COLUMNS as _CSV_HEADER
from chexdist.data.nih import IMAGE_SUFFIXES
from chexdist.data.shardformat import IMAGE_KEYS, iter_tar, load_manifest, shard_urls
from chexdist.data.transforms import build_transform, split_normalization

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


def _folder_loader(paths: list[Path], per_image, normalize, batch_size: int, workers: int, persistent: bool = False) -> DataLoader:
    """Per-file baseline with the engine's batching: uint8 batches from the workers, normalized by the consumer."""
    return DataLoader(FolderDataset(paths, per_image), batch_size=batch_size, shuffle=True, num_workers=workers,
                      worker_init_fn=_one_thread if workers else None, persistent_workers=persistent and workers > 0)


def _normalized(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], normalize) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield normalize(images), labels


def _steady_folder(paths: list[Path], per_image, normalize, batch_size: int, workers: int) -> Timing:
    loader = _folder_loader(paths, per_image, normalize, batch_size, workers, persistent=True)
    timing = _timed_steady(lambda epoch: _normalized(loader, normalize))
    del loader
    return timing


def _steady_stream(shards: Path, transform, batch_size: int, workers: int, manifest: dict) -> Timing:
    loader, _ = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
                                   normalize_in_loader=False, persistent_workers=True)

    def epoch(e: int):
        loader.set_epoch(e)
        return _as_engine_consumes(loader)

    timing = _timed_steady(epoch)
    del loader
    return timing


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def _write_shard_images(shard_dir: Path, folder: Path) -> list[Path]:
    """The shards' own image bytes as one file each (same pixels, codec and size as the stream reads)."""
    folder.mkdir()
    paths = []
    for url in shard_urls(shard_dir, "train"):
        for sample in iter_tar(url):
            ext = next(k for k in IMAGE_KEYS if k in sample)
            path = folder / f"{sample['__key__']}.{ext}"
            path.write_bytes(sample[ext])
            paths.append(path)
    return paths


def _shorter_sides(paths: list[Path]) -> list[int]:
    from PIL import Image

    sides = set()
    for path in paths:
        with Image.open(path) as im:
            sides.add(min(im.size))
    return sorted(sides)


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


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers are joined at the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _own_cpu_seconds() -> float:
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


def _timed_steady(make: Callable[[int], Iterable[Any]]) -> Timing:
    """The second pass of a loader with persistent workers (`make(epoch)` starts pass `epoch`): no
    worker start-up, as in training after the first epoch. CPU time counts the live workers via /proc."""
    for _ in make(0):
        pass
    own, workers, wall = _own_cpu_seconds(), _live_children_cpu_seconds(), time.perf_counter()
    images = 0
    for batch in make(1):
        images += len(batch[0])
    own = _own_cpu_seconds() - own
    return Timing(images, time.perf_counter() - wall, own + _live_children_cpu_seconds() - workers, own)


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
    blobs = [image_bytes(sample) for url in shard_urls(shard_dir, "train") for sample in iter_tar(url)]
    return _timed(lambda: _decode_each(blobs, transform))


def _stage_costs(shard_dir: Path, transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> dict[str, float]:
    """CPU ms per image of each stage of the train stream, each run on its own over the whole split on
    one thread, with the loader's own functions: what `stream_1proc_cpu_ms` is made of. What the stages
    do not add up to is the loader's glue (sample planning, the shuffle buffer, generators)."""
    per_image, normalize = split_normalization(transform)
    costs: dict[str, float] = {}

    def stage(name: str, run: Callable[[], Any]) -> Any:
        start = time.process_time()
        result = run()
        costs[name] = time.process_time() - start
        return result

    samples = stage("tar", lambda: [s for url in shard_urls(shard_dir, "train") for s in iter_tar(url)])
    labels = stage("labels", lambda: [parse_labels(s)[0] for s in samples])
    gray = stage("decode", lambda: [decode_gray(image_bytes(s)) for s in samples])
    images = stage("transform", lambda: [per_image(g) for g in gray])
    batches = range(0, len(images), batch_size)
    stage("seeding", lambda: _seed_each(batches))
    collated = stage("collate", lambda: [(collate_images(images[b:b + batch_size], None), torch.stack(labels[b:b + batch_size]))
                                         for b in batches])
    stage("normalize", lambda: _normalize_each(normalize, collated))
    return {name: round(1e3 * seconds / len(samples), 4) for name, seconds in costs.items()}


def _normalize_each(normalize: Callable[[torch.Tensor], torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for images, _ in batches:
        normalize(images)  # each output freed before the next, as the consumer's is


def _seed_each(batches: Iterable[int]) -> None:
    for b in batches:
        with seeded(seed_words(0, 0, 0, 0, b)):
            pass


def _decode_each(blobs: list[bytes], transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[list[torch.Tensor]]]:
    for blob in blobs:
        yield ([transform(decode_gray(blob))],)


def _best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.wall_s / t.images)


def _main_cpu_ms(timings: list[Timing]) -> float:
    """The consuming process's CPU ms per image in the run with the least CPU time in all."""
    best = min(timings, key=lambda t: t.cpu_ms)
    return round(1e3 * best.main_cpu_s / best.images, 3)


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
    """Shard stream vs per-file folders: same images, eval transform, workers, batch size and batching.

    Packs `count` images from `images` (cycled if fewer) into `size`-px shards per format, and yields
    two lines per format (`comparison`):

    - "packed (pre-resized) vs raw files": the stream vs the original files (e.g. 1024-px PNGs); this
      measures pre-resizing (and for JPEG the codec) as much as streaming.
    - "stream vs same-resolution files": the stream vs the shards' own image bytes written as one file
      each (512-px PNG, or JPEG for the jpg shards): only the streaming differs. This line also holds
      decode_only (bare decode + transform of the shard bytes in memory, one thread), stream_1proc
      (ours without workers, one thread), stream_overhead (their CPU-time ratio - 1: tar reading,
      shuffling, collation), stage_cpu_ms (what stream_1proc is made of, stage by stage: tar, labels,
      decode, transform, seeding, collate, normalize; glue_cpu_ms is the rest) and pipeline_overhead
      (the whole `workers` pipeline's CPU time over bare decode - 1: also worker start-up, IPC and the
      consumer's normalization). With workers (and
      /proc), *_steady_cpu_ms and pipeline_overhead_steady measure a second pass with persistent
      workers (no start-up), as every epoch after the first in training; *_steady_main_cpu_ms is the
      consuming process's part (receiving batches from the workers and normalizing them).

    Every loader ships uint8 batches that the consuming process normalizes, as the engine does.
    Each measurement runs `repeats` times, interleaved, best kept, worker start-up included.
    *_img_s is wall-clock throughput; *_cpu_ms is CPU time per image of the process and its workers,
    which a busy machine does not distort (cpu_ratio = per-core speed-up).
    """
    from chexdist.data.pack import PackSettings, pack_dataset

    if count < 1 or workers < 0 or batch_size < 1 or repeats < 1:
        raise ChexdistError("--count, --batch-size and --repeats must be >= 1 and --workers >= 0")
    files = find_images(images)
    transform = build_transform("none", image_size=image_size, eval_resize=eval_resize, train=False)
    per_image, normalize = split_normalization(transform)
    steady = os.path.isdir("/proc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-", dir=work_dir) as tmp:
        root = Path(tmp) / "nih"
        paths = make_nih_root(files, count, root)
        raw_px = _shorter_sides(paths)
        try:
            for fmt in formats:
                shards = Path(tmp) / f"shards-{fmt}"
                settings = PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=size, format=fmt,
                                        quality=quality, shard_size=shard_size)
                pack_dataset(root, shards, settings, workers=max(1, workers), progress=False)
                manifest = load_manifest(shards)
                same_res = _write_shard_images(shards, Path(tmp) / f"files-{fmt}")
                ours, single, raw, files_same, bare, ours_steady, files_steady = [], [], [], [], [], [], []
                for _ in range(repeats):
                    ours.append(_timed(lambda: _as_engine_consumes(build_train_loader(
                        shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
                        normalize_in_loader=False)[0])))
                    raw.append(_timed(lambda: _normalized(_folder_loader(paths, per_image, normalize, batch_size, workers), normalize)))
                    files_same.append(_timed(lambda: _normalized(_folder_loader(same_res, per_image, normalize, batch_size, workers), normalize)))
                    if workers and steady:
                        ours_steady.append(_steady_stream(shards, transform, batch_size, workers, manifest))
                        files_steady.append(_steady_folder(same_res, per_image, normalize, batch_size, workers))
                    single.append(_timed(lambda: _as_engine_consumes(build_train_loader(
                        shards, batch_size, transform, 0, 1, 0, seed=0, epoch=0, manifest=manifest,
                        normalize_in_loader=False)[0])))
                    bare.append(_decode_only(shards, transform))
                stages = _stage_costs(shards, transform, batch_size)
                common = {
                    "bench": "loader", "format": fmt, "workers": workers, "images": count, "batch_size": batch_size,
                    "ours_px": size, "image_size": image_size,
                    "shard_bytes": sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]), "cpus": os.cpu_count(),
                }
                for comparison, baseline, baseline_px, baseline_format in (
                    ("packed (pre-resized) vs raw files", raw, raw_px, sorted({p.suffix.lstrip(".") for p in paths})),
                    ("stream vs same-resolution files", files_same, _shorter_sides(same_res), [fmt]),
                ):
                    result = {**common, "comparison": comparison, **_compare(ours, baseline),
                              "baseline_px": baseline_px, "baseline_format": baseline_format}
                    if baseline is files_same:
                        single_cpu, bare_cpu = _best_cpu(single), _best_cpu(bare)
                        result.update({
                            "decode_only_img_s": round(_best(bare).img_s, 1),
                            "decode_only_cpu_ms": round(bare_cpu, 3),
                            "stream_1proc_img_s": round(_best(single).img_s, 1),
                            "stream_1proc_cpu_ms": round(single_cpu, 3),
                            "stream_overhead": round(single_cpu / bare_cpu - 1, 3),
                            "pipeline_overhead": round(_best_cpu(ours) / bare_cpu - 1, 3),
                            "stage_cpu_ms": stages,
                            "glue_cpu_ms": round(single_cpu - sum(stages.values()), 4),
                        })
                        if ours_steady:
                            result.update({
                                "ours_steady_cpu_ms": round(_best_cpu(ours_steady), 3),
                                "ours_steady_main_cpu_ms": _main_cpu_ms(ours_steady),
                                "baseline_steady_cpu_ms": round(_best_cpu(files_steady), 3),
                                "baseline_steady_main_cpu_ms": _main_cpu_ms(files_steady),
                                "pipeline_overhead_steady": round(_best_cpu(ours_steady) / bare_cpu - 1, 3),
                            })
                    yield result
        finally:
            torch.set_num_threads(threads)


def _compare(ours: list[Timing], baseline: list[Timing]) -> dict[str, float]:
    ours_img_s, baseline_img_s = _best(ours).img_s, _best(baseline).img_s
    ours_cpu, baseline_cpu = _best_cpu(ours), _best_cpu(baseline)
    return {
        "ours_img_s": round(ours_img_s, 1),
        "baseline_img_s": round(baseline_img_s, 1),
        "ratio": round(ours_img_s / baseline_img_s, 2),
        "ours_cpu_ms": round(ours_cpu, 3),
        "baseline_cpu_ms": round(baseline_cpu, 3),
        "cpu_ratio": round(baseline_cpu / ours_cpu, 2),
    }


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
                start, cpu_start, own_start = time.perf_counter(), _cpu_seconds(), _own_cpu_seconds()
                pack_dataset(root, Path(tmp) / f"out-{runs}", settings, workers=n, progress=False)
                rates[n].append(count / (time.perf_counter() - start))
                cpu[n].append(1e3 * (_cpu_seconds() - cpu_start) / count)
                main[n].append(1e3 * (_own_cpu_seconds() - own_start) / count)
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


def _pack_real(images: str | os.PathLike, count: int, root: Path, settings) -> Path:
    from chexdist.data.pack import pack_dataset

    make_nih_root(find_images(images), count, root / "nih")
    pack_dataset(root / "nih", root / "shards", settings, workers=2, progress=False)
    return root / "shards"


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
        shards = _pack_real(images, count, Path(tmp), PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=size))
        num_batches = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0)[1]
        for fraction in fractions:
            k = min(num_batches - 1, int(fraction * num_batches))
            times: dict[str, list[Timing]] = {"skip": [], "start": []}
            first: dict[str, torch.Tensor] = {}
            for _ in range(repeats):
                for how in ("skip", "start"):
                    cpu, wall = _cpu_seconds(), time.perf_counter()
                    loader, _ = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0,
                                                   start_batch=k if how == "start" else 0, normalize_in_loader=False)
                    batches = iter(loader)
                    for _ in range(0 if how == "start" else k):
                        next(batches)
                    first[how] = next(batches)[0]
                    seconds = time.perf_counter() - wall
                    del batches, loader  # joins the workers, so their CPU time is counted
                    times[how].append(Timing(1, seconds, _cpu_seconds() - cpu))
            if not torch.equal(first["skip"], first["start"]):
                raise ChexdistError("resume bench: start_batch gave another batch than skipping; the loader is broken")
            before, after = _best(times["skip"]), _best(times["start"])
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


class SentBytes:
    """Body bytes an HTTP server has written to its sockets, summed over its threads (counted as each
    write starts, so a reader that has finished never finds its bytes missing)."""

    def __init__(self):
        self.total = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


class FolderHandler(BaseHTTPRequestHandler):
    """GET of the files in `folder` (set by :func:`serve_folder`), honouring ``Range: bytes=N-`` and
    ``bytes=N-M`` with 206 and a Content-Range when `ranges`, else answering 200 with the whole file."""

    folder: Path
    ranges: bool
    sent: SentBytes
    _RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")

    def do_GET(self) -> None:
        path = (self.folder / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        wanted = self._RANGE.match(self.headers.get("Range", "")) if self.ranges else None
        if wanted is None:
            self.answer(path, 200, 0, size - 1, size)
            return
        start = int(wanted[1])
        end = min(int(wanted[2]), size - 1) if wanted[2] else size - 1
        if start >= size or end < start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.answer(path, 206, start, end, size)

    def answer(self, path: Path, status: int, start: int, end: int, size: int) -> None:
        """Send bytes start..end of `path` with `status` (206 adds the Content-Range); a client that
        hangs up mid-body ends the answer."""
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end + 1 - start
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                self.sent.add(len(chunk))  # before the write, so a client never sees bytes not yet counted
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.sent.add(-len(chunk))
                    return
                left -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike, ranges: bool = True,
                 handler: type[FolderHandler] = FolderHandler) -> Iterator[tuple[str, SentBytes]]:
    """Serve `folder` over HTTP on 127.0.0.1 (a ThreadingHTTPServer in a thread) for the block:
    yields (base URL, the body bytes sent). ranges=False stands for a server that ignores Range."""
    sent = SentBytes()
    bound = type("Handler", (handler,), {"folder": Path(folder).resolve(), "ranges": ranges, "sent": sent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="chexdist-serve-folder", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", sent
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def reads_suite(ranks: int = 8, workers: int = 8, shards: int = 80, count: int = 1600, batch_size: int = 4,
                **_: Any) -> Iterator[dict[str, Any]]:
    """Shard bytes read in one training epoch by `ranks` x `workers` readers, against the dataset's size.

    Synthetic 32-px images packed into `shards` train shards (the bytes read, not the pixels, are
    measured). Every rank's loader runs in this process one after another, with its real worker
    processes. "local": a shard folder (readers seek to their first sample with the offset index);
    "stream": the same shards through `pipe:cat` (readers read each shard from its start, as with
    object stores); "stream-ranged": through a `pipe:` command with an `{offset}` placeholder
    (`tail -c`, standing in for an object store's byte-range GET), so readers start at their first
    sample's byte; "http": a base URL served by :func:`serve_folder` on 127.0.0.1, whose readers ask
    for their byte range with HTTP Range requests. read_ratio = bytes read / bytes of the train shards
    (1.0 = each byte once); for "http", sent_ratio = body bytes the server sent / the same.
    """
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    transform = build_transform("none", image_size=8, eval_resize=8, train=False)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-reads-") as tmp:
        make_synthetic_nih(Path(tmp) / "nih", images=count, size=32, seed=0)
        out = Path(tmp) / "shards"
        settings = PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=0, shard_size=max(1, -(-count // shards)))
        manifest = pack_dataset(Path(tmp) / "nih", out, settings, workers=2, progress=False)
        train = manifest["splits"]["train"]
        dataset_bytes = sum(s["bytes"] for s in train["shards"])
        with serve_folder(out) as (base_url, sent):
            sources = (("local", str(out)), ("stream", f"pipe:cat {out}/{{name}}"),
                       ("stream-ranged", f"pipe:tail -c +$(({{offset}} + 1)) {out}/{{name}}"), ("http", base_url))
            for name, where in sources:
                read, sent_before = 0, sent.total
                for rank in range(ranks):
                    with warnings.catch_warnings():  # more workers than cores is the point here
                        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
                        loader, _ = build_train_loader(where, batch_size, transform, workers, ranks, rank, seed=0, epoch=0, manifest=manifest)
                        for _ in loader:
                            pass
                    read += loader.bytes_read
                result = {
                    "bench": "reads",
                    "source": name,
                    "ranks": ranks,
                    "workers": workers,
                    "shards": len(train["shards"]),
                    "images": train["samples"],
                    "dataset_bytes": dataset_bytes,
                    "bytes_read": read,
                    "read_ratio": round(read / dataset_bytes, 3),
                }
                if name == "http":
                    result["bytes_sent"] = sent.total - sent_before
                    result["sent_ratio"] = round(result["bytes_sent"] / dataset_bytes, 3)
                yield result


def train_suite(model: str = "resnet18", image_size: int = 128, batch_size: int = 16, steps: int = 20,
                precision: str = "no", repeats: int = 6, **_: Any) -> Iterator[dict[str, Any]]:
    """`engine.train_epoch` vs a bare PyTorch loop: same model init, batches, optimizer, loss and
    precision, alternated `repeats` times (each goes first half the time); best of each. Batches are in memory so only the loops differ."""
    import copy

    from chexdist.config import load_config
    from chexdist.training.checkpoint import TrainState
    from chexdist.training.engine import Checkpointer, StopFlag, train_epoch
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


def tune_suite(**options: Any) -> Iterator[dict[str, Any]]:
    from chexdist.bench.tune import tune_suite as suite  # Ray is imported only when this suite runs

    return suite(**options)


SUITES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "loader": loader_suite, "pack": pack_suite, "train": train_suite, "resume": resume_suite, "reads": reads_suite,
    "tune": tune_suite,
}


def run_suite(name: str, out=sys.stdout, **options: Any) -> list[dict[str, Any]]:
    """Run suite `name`, printing each result as one JSON line as soon as it is measured."""
    if name not in SUITES:
        raise ChexdistError(f"unknown bench {name!r}; choose one of {', '.join(SUITES)}")
    results = []
    for result in SUITES[name](**options):
        print(dumps_json(result), file=out, flush=True)
        results.append(result)
    return results
