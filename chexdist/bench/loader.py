"""`chexdist bench loader`: the shard stream vs per-file folders of the same images, stage costs included."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from chexdist.bench.fixtures import find_images, make_nih_root
from chexdist.bench.timing import Timing, best, best_cpu, compare, main_cpu_ms, timed, timed_steady
from chexdist.data.loader import (
    collate_images,
    seed_words,
    seeded,
    build_train_loader,
)
from chexdist.data.samples import decode_gray, image_bytes
from chexdist.data.shardindex import load_index
from chexdist.errors import ChexdistError
from chexdist.labels import NUM_LABELS
from chexdist.data.shardformat import IMAGE_KEYS, iter_tar, load_manifest, shard_urls
from chexdist.config import AugConfig, Config, DataConfig
from chexdist.data.batchaug import train_stages
from chexdist.data.transforms import build_transform, split_normalization


# The GPU rate the loader must feed when no GPU is measured here: timm's published train benchmark
# (its results/ folder), DenseNet-121 at 224 under AMP autocast (float16 in timm's benchmark.py) on an RTX 3090.
REFERENCE = {
    "model": "densenet121", "img_size": 224, "train_img_s": 730.11, "batch_size": 256, "precision": "amp (float16 autocast)",
    "gpu": "RTX 3090", "source": "huggingface/pytorch-image-models results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv",
}


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
    timing = timed_steady(lambda epoch: _normalized(loader, normalize))
    del loader
    return timing


def _steady_stream(shards: Path, transform, batch_size: int, workers: int, manifest: dict, on_gpu: bool = False) -> Timing:
    """A steady pass consumed as a CPU run does (normalized here), or with `on_gpu` as a GPU run does: the
    uint8 batches are handed over as they come (the run normalizes on the device)."""
    loader, _ = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
                                   normalize_in_loader=False, persistent_workers=True)

    def epoch(e: int):
        loader.set_epoch(e)
        return iter(loader) if on_gpu else _as_engine_consumes(loader)

    timing = timed_steady(epoch)
    del loader
    return timing


def _proc_times(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and int(_stat_field(entry.name, 1)) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stat_field(pid: str, i: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[i]


def _steady_split(shards: Path, transform, batch_size: int, workers: int, manifest: dict) -> dict[str, float]:
    """A steady pass (persistent workers, second pass) split into user and system (kernel) CPU ms per image
    and minor page faults per image, for the consuming process and the workers: the system part is mostly
    page faults on fresh batch buffers (each batch a new shared-memory segment; the consumer's float batch)."""
    loader, _ = build_train_loader(shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
                                   normalize_in_loader=False, persistent_workers=True)
    loader.set_epoch(0)
    for _ in _as_engine_consumes(loader):
        pass
    me = os.getpid()
    kids = _children(me)
    before = {pid: _proc_times(pid) for pid in [me, *kids]}
    loader.set_epoch(1)
    images = sum(len(images) for images, _ in _as_engine_consumes(loader))
    after = {pid: _proc_times(pid) for pid in before}
    del loader

    def per_image(pids: list[int], i: int, scale: float) -> float:
        return round(scale * sum(after[p][i] - before[p][i] for p in pids) / images, 3)

    return {"main_user_ms": per_image([me], 0, 1e3), "main_sys_ms": per_image([me], 1, 1e3), "main_faults": per_image([me], 2, 1),
            "workers_user_ms": per_image(kids, 0, 1e3), "workers_sys_ms": per_image(kids, 1, 1e3),
            "workers_faults": per_image(kids, 2, 1)}


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


def _as_engine_consumes(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield loader.normalize(images), labels


def _bare_parallel(blobs: list[bytes], transform: Callable[[torch.Tensor], torch.Tensor], processes: int) -> Timing:
    """Bare decode + transform split over `processes` processes running at once, each on one thread with
    its bytes in memory: the same work at the workers' parallelism, with no pipeline at all. Each
    process times its own decode loop only (not its start, nor the copy-on-write faults of touching
    its share first), all starting together."""
    import multiprocessing

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    barrier, results = context.Barrier(processes), context.SimpleQueue()
    jobs = [context.Process(target=_decode_share, args=(blobs[i::processes], transform, barrier, results))
            for i in range(processes)]
    for job in jobs:
        job.start()
    got = [results.get() for _ in jobs]
    for job in jobs:
        job.join()
    if any(job.exitcode for job in jobs) or any(r is None for r in got):
        raise ChexdistError(f"bare decode in {processes} processes: a process failed (exit codes {[j.exitcode for j in jobs]})")
    wall = max(end for _, _, end in got) - min(start for _, start, _ in got)
    return Timing(len(blobs), wall, sum(cpu for cpu, _, _ in got))


def _decode_share(blobs: list[bytes], transform: Callable[[torch.Tensor], torch.Tensor], barrier, results) -> None:
    """One process of `_bare_parallel`: (CPU s, start, end) of its decode loop, or None if it failed."""
    try:
        torch.set_num_threads(1)
        sum(len(blob) for blob in blobs)  # take the copy-on-write faults of the shared list before timing
        barrier.wait()
        cpu, start = time.process_time(), time.perf_counter()
        for _ in _decode_each(blobs, transform):
            pass
        results.put((time.process_time() - cpu, start, time.perf_counter()))
    except BaseException:
        results.put(None)
        raise


def _stage_costs(shard_dir: Path, transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> dict[str, float]:
    """CPU ms per image of each stage of the train stream, each run on its own over the whole split on
    one thread, as the loader runs it (indexed shards: one positioned read per sample, labels from the
    index): what `stream_1proc_cpu_ms` is made of. What the stages do not add up to is the loader's
    glue (sample planning, the shuffle buffer, generators)."""
    per_image, normalize = split_normalization(transform)
    records = load_manifest(shard_dir)["splits"]["train"]["shards"]
    indexes = [(str(shard_dir / r["name"]), load_index(str(shard_dir / r["name"]), r["samples"], r.get("offsets"))) for r in records]
    if any(index is None for _, index in indexes):
        raise ChexdistError(f"{shard_dir}: shards without an index; the bench packs its own, so this is a bug")
    costs: dict[str, float] = {}

    def stage(name: str, run: Callable[[], Any]) -> Any:
        start = time.process_time()
        result = run()
        costs[name] = time.process_time() - start
        return result

    blobs = stage("read", lambda: [blob for path, index in indexes for blob in _pread_all(path, index)])
    labels = stage("labels", lambda: [torch.from_numpy(index.labels[i]) for _, index in indexes for i in range(len(index.keys))])
    gray = stage("decode", lambda: [decode_gray(b) for b in blobs])
    images = stage("transform", lambda: [per_image(g) for g in gray])
    batches = range(0, len(images), batch_size)
    stage("seeding", lambda: _seed_each(batches))
    collated = stage("collate", lambda: [(collate_images(images[b:b + batch_size], None), torch.stack(labels[b:b + batch_size]))
                                         for b in batches])
    stage("normalize", lambda: _normalize_each(normalize, collated))
    return {name: round(1e3 * seconds / len(blobs), 4) for name, seconds in costs.items()}


def _pread_all(path: str, index) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, int(n), int(at)) for at, n in zip(index.start, index.size)]
    finally:
        os.close(fd)


def _decoders(blobs: list[bytes], fmt: str, side: int) -> dict[str, float]:
    """CPU ms per image of each gray decoder the stack has, on the shard bytes: torchvision (libpng /
    libjpeg-turbo on the bytes, what the loader uses), PIL, and for JPEG PIL with draft() (DCT-domain
    downscaling to >= `side`, the eval resize: fewer pixels, not the same pixels)."""
    import io

    from PIL import Image

    def pil(blob: bytes) -> Any:
        with Image.open(io.BytesIO(blob)) as im:
            return im.convert("L").load()

    def draft(blob: bytes) -> Any:
        with Image.open(io.BytesIO(blob)) as im:
            im.draft("L", (side, side))
            return im.convert("L").load()

    candidates: dict[str, Callable[[bytes], Any]] = {"torchvision": decode_gray, "pil": pil}
    if fmt in ("jpg", "jpeg"):
        candidates["pil_draft"] = draft
    costs = {}
    for name, decode in candidates.items():
        start = time.process_time()
        for blob in blobs:
            decode(blob)
        costs[name] = round(1e3 * (time.process_time() - start) / len(blobs), 4)
    return costs


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
      gpu_steady_* is the same steady pass consumed as a GPU run consumes it (uint8 batches handed
      over; the run normalizes on the device), against bare decode + the workers' transform to uint8
      on one thread (bare_uint8_cpu_ms, gpu_steady_overhead) and split over `workers` processes at
      once (bare_parallel_cpu_ms, gpu_steady_overhead_parallel: the same work at the same parallelism
      with no pipeline). img_s_per_core_steady and cores_for_reference are the GPU consumer's.

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
                blobs = [image_bytes(sample) for url in shard_urls(shards, "train") for sample in iter_tar(url)]
                t = _measure(shards, manifest, paths, same_res, blobs, transform, batch_size, workers, repeats)
                stages = _stage_costs(shards, transform, batch_size)
                split = _steady_split(shards, transform, batch_size, workers, manifest) if workers and os.path.isdir("/proc") else None
                decoders = _decoders(blobs, fmt, eval_resize)
                common = {
                    "bench": "loader", "format": fmt, "workers": workers, "images": count, "batch_size": batch_size,
                    "ours_px": size, "image_size": image_size,
                    "shard_bytes": sum(s["bytes"] for s in manifest["splits"]["train"]["shards"]), "cpus": os.cpu_count(),
                }
                yield {**common, "comparison": "packed (pre-resized) vs raw files", **compare(t["ours"], t["raw"]),
                       "baseline_px": raw_px, "baseline_format": sorted({p.suffix.lstrip(".") for p in paths})}
                yield {**common, "comparison": "stream vs same-resolution files", **compare(t["ours"], t["files_same"]),
                       "baseline_px": _shorter_sides(same_res), "baseline_format": [fmt], **_stream_figures(t, stages),
                       "decoder_cpu_ms": decoders, "decoder_fastest": min(decoders, key=decoders.get),
                       **({"steady_split": split} if split else {})}
                yield {**common, **device_augment_figures(shards, manifest, image_size, eval_resize, batch_size, workers, repeats)}
        finally:
            torch.set_num_threads(threads)


def device_augment_figures(shards: Path, manifest: dict, image_size: int, eval_resize: int, batch_size: int,
                           workers: int, repeats: int) -> dict[str, Any]:
    """The "augmentation in the workers vs on the device" line: the workers' CPU ms per image with
    the worker-side dannynet augmentation (`workers_aug_cpu_ms`) and with aug.where=device, where
    they only decode (and centre-crop to the packed size `worker_px`: `workers_load_cpu_ms`), their
    ratio, and what the device then does per image (resize to `load_px`, augment, normalize), timed
    here on one CPU thread (`device_aug_cpu_ms`; on a GPU that is GPU time), with the parameter
    draws that stay on the host CPU (`device_params_cpu_ms`). The ratio
    is null when the workers' CPU time is below the clock's resolution (a few tiny images)."""
    config = Config(aug=AugConfig(preset="dannynet"), data=DataConfig(image_size=image_size, eval_resize=eval_resize))
    in_workers, _ = train_stages(config, None, on_device=False)
    load, augment = train_stages(config, None, on_device=True, source_size=int(manifest["image"]["size"] or 0))
    steady = bool(workers) and os.path.isdir("/proc")
    pairs = [[_workers_cpu_ms(shards, manifest, t, batch_size, workers, steady) for t in (in_workers, load)]
             for _ in range(repeats)]  # interleaved, best of each kept, as the other lines
    aug_ms, load_ms = (min(column) for column in zip(*pairs))
    side = augment.input_size
    batch = torch.randint(0, 256, (batch_size, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rounds = max(1, 256 // batch_size)
    start = time.process_time()
    for k in range(rounds):
        augment.sample(batch_size, torch.Generator().manual_seed(k))
    params_ms = 1e3 * (time.process_time() - start) / (rounds * batch_size)
    start = time.process_time()
    for k in range(rounds):
        augment(batch, torch.Generator().manual_seed(k))
    device_ms = 1e3 * (time.process_time() - start) / (rounds * batch_size)
    return {"comparison": "augmentation in the workers vs on the device", "preset": config.aug.preset, "worker_px": side,
            "load_px": augment.load_size,
            "steady": steady, "workers_aug_cpu_ms": round(aug_ms, 3), "workers_load_cpu_ms": round(load_ms, 3),
            "worker_cpu_ratio": round(aug_ms / load_ms, 2) if load_ms > 0 else None, "device_aug_cpu_ms": round(device_ms, 3),
            "device_params_cpu_ms": round(params_ms, 4)}


def _workers_cpu_ms(shards: Path, manifest: dict, transform, batch_size: int, workers: int, steady: bool) -> float:
    """CPU ms per image of the train loader's workers alone: a steady pass with persistent workers,
    less the consuming process's part (receiving and normalizing); without workers (or /proc), one
    pass in one process of the uint8 batches (no consumer)."""
    if not steady:
        return timed(lambda: build_train_loader(shards, batch_size, transform, 0, 1, 0, seed=0, epoch=0, manifest=manifest,
                                                normalize_in_loader=False)[0]).cpu_ms
    timing = _steady_stream(shards, transform, batch_size, workers, manifest)
    return 1e3 * (timing.cpu_s - timing.main_cpu_s) / timing.images


def _measure(shards: Path, manifest: dict, paths: list[Path], same_res: list[Path], blobs: list[bytes], transform,
             batch_size: int, workers: int, repeats: int) -> dict[str, list[Timing]]:
    """Every loader of the suite, `repeats` times interleaved (one after another within a repeat)."""
    per_image, normalize = split_normalization(transform)
    steady = os.path.isdir("/proc")
    keys = ("ours", "single", "raw", "files_same", "bare", "ours_steady", "files_steady", "gpu_steady", "bare_uint8", "bare_parallel")
    t: dict[str, list[Timing]] = {k: [] for k in keys}
    for _ in range(repeats):
        t["ours"].append(timed(lambda: _as_engine_consumes(build_train_loader(
            shards, batch_size, transform, workers, 1, 0, seed=0, epoch=0, manifest=manifest,
            normalize_in_loader=False)[0])))
        t["raw"].append(timed(lambda: _normalized(_folder_loader(paths, per_image, normalize, batch_size, workers), normalize)))
        t["files_same"].append(timed(lambda: _normalized(_folder_loader(same_res, per_image, normalize, batch_size, workers), normalize)))
        if workers and steady:
            t["ours_steady"].append(_steady_stream(shards, transform, batch_size, workers, manifest))
            t["files_steady"].append(_steady_folder(same_res, per_image, normalize, batch_size, workers))
            t["gpu_steady"].append(_steady_stream(shards, transform, batch_size, workers, manifest, on_gpu=True))
            t["bare_uint8"].append(timed(lambda: _decode_each(blobs, per_image)))
            t["bare_parallel"].append(_bare_parallel(blobs, per_image, workers))
        t["single"].append(timed(lambda: _as_engine_consumes(build_train_loader(
            shards, batch_size, transform, 0, 1, 0, seed=0, epoch=0, manifest=manifest,
            normalize_in_loader=False)[0])))
        t["bare"].append(timed(lambda: _decode_each(blobs, transform)))  # bare decode + transform, bytes in memory
    return t


def _stream_figures(t: dict[str, list[Timing]], stages: dict[str, float]) -> dict[str, Any]:
    """The "stream vs same-resolution files" line's own figures: bare decode, one-process stream, the
    overheads over bare decode, stage costs and, with persistent workers, the steady pass."""
    single_cpu, bare_cpu = best_cpu(t["single"]), best_cpu(t["bare"])
    figures = {
        "decode_only_img_s": round(best(t["bare"]).img_s, 1),
        "decode_only_cpu_ms": round(bare_cpu, 3),
        "stream_1proc_img_s": round(best(t["single"]).img_s, 1),
        "stream_1proc_cpu_ms": round(single_cpu, 3),
        "stream_overhead": round(single_cpu / bare_cpu - 1, 3),
        "pipeline_overhead": round(best_cpu(t["ours"]) / bare_cpu - 1, 3),
        "stage_cpu_ms": stages,
        "glue_cpu_ms": round(single_cpu - sum(stages.values()), 4),
    }
    if t["ours_steady"]:
        figures.update({
            "ours_steady_cpu_ms": round(best_cpu(t["ours_steady"]), 3),
            "ours_steady_main_cpu_ms": main_cpu_ms(t["ours_steady"]),
            "baseline_steady_cpu_ms": round(best_cpu(t["files_steady"]), 3),
            "baseline_steady_main_cpu_ms": main_cpu_ms(t["files_steady"]),
            "pipeline_overhead_steady": round(best_cpu(t["ours_steady"]) / bare_cpu - 1, 3),
            "img_s_per_core_steady": round(1e3 / best_cpu(t["gpu_steady"]), 1),  # what feeding a GPU costs
            "cores_for_reference": round(REFERENCE["train_img_s"] * best_cpu(t["gpu_steady"]) / 1e3, 2),
            "reference": REFERENCE,
            **_gpu_consumer_figures(t),
        })
    return figures


def _gpu_consumer_figures(t: dict[str, list[Timing]]) -> dict[str, float]:
    """The steady stream as a GPU run consumes it (uint8 batches; normalized on the device) against the
    same work with no pipeline: bare decode + the workers' transform (uint8), on one thread and split
    over as many processes as there are workers, all at once."""
    gpu, bare, parallel = best_cpu(t["gpu_steady"]), best_cpu(t["bare_uint8"]), best_cpu(t["bare_parallel"])
    return {
        "gpu_steady_cpu_ms": round(gpu, 3),
        "gpu_steady_main_cpu_ms": main_cpu_ms(t["gpu_steady"]),
        "bare_uint8_cpu_ms": round(bare, 3),
        "bare_parallel_cpu_ms": round(parallel, 3),
        "gpu_steady_overhead": round(gpu / bare - 1, 3),
        "gpu_steady_overhead_parallel": round(gpu / parallel - 1, 3),
    }
