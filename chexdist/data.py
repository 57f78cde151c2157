"""Streaming WebDataset loaders: equal batches per rank, exact-once eval, counted skips.

Shards are read with webdataset's own tar iterator (``tar_file_iterator`` + ``group_by_keys``) from
streams opened by ``webdataset.gopen`` (local files, http(s), ``pipe:`` commands), so the same code
serves a laptop, a cluster filesystem and an object store; train samples pass through webdataset's
buffer ``shuffle``.
The manifest's per-shard sample counts are the single source of truth for how many batches each rank
produces: the counts are known before any byte is read, so every rank agrees without communicating.

Where the shards live (`shard_dir`, the `data.shards` config key) is one of:

- a directory: ``shards/nih`` -> ``shards/nih/train-000000.tar``;
- a template containing ``{name}``: ``pipe:aws s3 cp s3://bucket/nih/{name} -`` or
  ``https://host/nih/{name}``; ``manifest.json`` is fetched through the same template unless a local
  copy is given (``manifest=`` argument or :func:`load_manifest` ``manifest_path``);
- an ``http(s)://`` / ``file://`` base URL without ``{name}``: ``/{name}`` is appended.

Sample positions, not whole shards, are divided among ranks and workers, planned here from the
manifest counts: webdataset's split_by_node / split_by_worker split by shard, so they cannot give
every rank the same number of samples, and DDP would then hang (a rank waits in a collective another
rank never reaches) or drop data. Planning positions works with any number of shards, ranks and
workers. Train: see :func:`build_train_loader`.
Eval: see :func:`build_eval_loader` for the padding/mask contract.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NUM_LABELS
from chexdist.shardformat import IMAGE_KEYS, iter_tar, load_manifest, resolve, split_shards
from chexdist.transforms import GrayToNormalizedRGB, split_normalization

log = logging.getLogger(__name__)

_LOG_FIRST = 20
_LOG_EVERY = 1000
_skips_logged = 0

Transform = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- skip accounting


class LoaderStats:
    """Samples skipped (unreadable shard part, undecodable image, bad json), summed over workers.

    Each worker writes only its own slot of a shared-memory tensor, so no lock is needed and the
    counts reach the main process under fork and spawn alike.
    """

    def __init__(self, slots: int):
        self.counts = torch.zeros(max(1, slots), dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> int:
        return int(self.counts.sum())

    def add(self, slot: int, n: int = 1) -> None:
        self.counts[slot] += n


def _report_skip(what: str, reason: BaseException | str) -> None:
    """Log one skipped sample: the first few in full, then every 1000th, so a bad shard can't flood logs."""
    global _skips_logged
    _skips_logged += 1
    if _skips_logged <= _LOG_FIRST or _skips_logged % _LOG_EVERY == 0:
        more = " (further skips are logged every 1000th)" if _skips_logged == _LOG_FIRST else ""
        log.warning("skipped %s: %s [%d skipped in this process]%s", what, reason, _skips_logged, more)


def _read_segments(urls: list[str], segments: Iterable[tuple[int, int, int]], stats: LoaderStats, slot: int) -> Iterator[dict | None]:
    """Exactly `take` items per (shard, skip, take) segment: a sample, or None for each one lost."""
    for shard, skip, take in segments:
        got = 0
        try:
            for sample in iter_tar(urls[shard], skip, take):
                got += 1
                yield sample
        except Exception as exc:
            reason: BaseException | str = exc
        else:
            reason = "shard ended early (cut or corrupt tar, or fewer samples than its manifest record)"
        if got < take:
            lost = take - got
            stats.add(slot, lost)
            _report_skip(f"{lost} sample(s) of {urls[shard]} from position {skip + got}", reason)
            yield from [None] * lost


# ---------------------------------------------------------------- decoding


# torchvision 0.29 deprecates its decoders in favour of TorchCodec but they remain the fastest here
# (512-px PNG 2.2 ms vs PIL 2.6 ms; JPEG 0.44 vs 0.50 ms); PIL takes over once they are gone.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode as _ReadMode
    from torchvision.io import decode_image as _tv_decode
except ImportError:
    _tv_decode = None


def decode_gray(data: bytes) -> torch.Tensor:
    """Shard image bytes -> uint8 tensor [1,H,W] (libpng/libjpeg-turbo via torchvision; PIL as fallback)."""
    if _tv_decode is not None:
        try:
            image = _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_ReadMode.GRAY)
            if image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 1:
                return image
        except RuntimeError:
            pass
    from chexdist.images import decode_gray8

    return torch.from_numpy(decode_gray8(data)).unsqueeze(0)


@dataclass
class _Decoded:
    image: torch.Tensor
    labels: torch.Tensor
    meta: dict


def _decode(sample: dict, transform: Transform) -> _Decoded:
    image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image_bytes is None or "json" not in sample:
        raise ChexdistError(f"sample has parts {sorted(k for k in sample if not k.startswith('__'))}, expected json and png/jpg")
    meta = json.loads(sample["json"])
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != NUM_LABELS or any(v not in (0, 1) for v in labels):
        raise ChexdistError(f"'labels' must be {NUM_LABELS} zeros/ones in the order {', '.join(LABELS)}")
    return _Decoded(transform(decode_gray(image_bytes)), torch.tensor(labels, dtype=torch.float32), meta)


def _worker_slot() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _worker_init(worker_id: int) -> None:
    """Decode is per sample: one thread per worker avoids oversubscribing the cores."""
    torch.set_num_threads(1)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in a worker it lives in shared memory, so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    except AttributeError:
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _collate(images: list[torch.Tensor], normalize: GrayToNormalizedRGB | None) -> torch.Tensor:
    """Stack per-image outputs; with `normalize`, stack uint8 and normalize the batch in one pass.

    Normalizing per batch, straight into the output buffer, saves a float copy of every image.
    """
    first = images[0]
    if normalize is None:
        return torch.stack(images, out=_empty((len(images), *first.shape), first.dtype))
    gray = torch.stack(images).to(torch.float32)
    out = _empty((len(images), normalize.scale.shape[0], *first.shape[-2:]), torch.float32)
    return torch.addcmul(normalize.shift, gray, normalize.scale, out=out)


# ---------------------------------------------------------------- the ring of train positions


def _ring_segments(counts: list[int], order: list[int], start: int, length: int | None) -> Iterator[tuple[int, int, int]]:
    """(shard, skip, take) covering ring positions start .. start+length-1, wrapping; None = forever.

    The ring is the concatenation of the shards in `order`; position q lies in shard order[i] where
    cum[i] <= q < cum[i+1].
    """
    cum = [0]
    for shard in order:
        cum.append(cum[-1] + counts[shard])
    total = cum[-1]
    q = start % total
    remaining = length
    while remaining is None or remaining > 0:
        i = bisect.bisect_right(cum, q) - 1
        take = cum[i + 1] - q
        if remaining is not None:
            take = min(take, remaining)
            remaining -= take
        yield order[i], q - cum[i], take
        q = (q + take) % total


@dataclass(frozen=True)
class _TrainPlan:
    """Everything one rank's streams need; plain data so the dataset pickles for any start method."""

    urls: list[str]
    counts: list[int]
    order: list[int]
    starts: list[int]
    batches: list[int]
    batch_size: int
    shuffle_buffer: int
    seeds: list[tuple[int, int]]


class TrainStream(IterableDataset):
    """One rank's train stream; worker w yields exactly plan.batches[w] full batches."""

    def __init__(self, plan: _TrainPlan, transform: Transform, normalize: GrayToNormalizedRGB | None, stats: LoaderStats):
        super().__init__()
        self.plan, self.transform, self.normalize, self.stats = plan, transform, normalize, stats

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p, slot = self.plan, _worker_slot()
        budget = p.batches[slot] * p.batch_size
        if budget == 0:
            return
        shuffle_seed, torch_seed = p.seeds[slot]
        mine = _read_segments(p.urls, _ring_segments(p.counts, p.order, p.starts[slot], budget), self.stats, slot)
        spare = _read_segments(p.urls, _ring_segments(p.counts, p.order, p.starts[slot] + budget, None), self.stats, slot)
        shuffled = shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=random.Random(shuffle_seed))(mine)
        items = chain(shuffled, spare)
        rng_state = torch.Generator().manual_seed(torch_seed).get_state()
        patience = sum(p.counts) + p.batch_size
        for _ in range(p.batches[slot]):
            images, labels, failed = [], [], 0
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng_state)
                while len(images) < p.batch_size:
                    item = next(items)
                    if item is not None:
                        try:
                            decoded = _decode(item, self.transform)
                            images.append(decoded.image)
                            labels.append(decoded.labels)
                            failed = 0
                            continue
                        except Exception as exc:
                            self.stats.add(slot)
                            _report_skip(f"{item['__key__']} in {item['__url__']}", exc)
                    failed += 1
                    if failed > patience:
                        raise ChexdistError(
                            f"train split ({len(p.urls)} shards, e.g. {p.urls[0]}): no decodable sample in a full "
                            "pass over the split; see the warnings above"
                        )
                rng_state = torch.get_rng_state()
            yield _collate(images, self.normalize), torch.stack(labels)


# ---------------------------------------------------------------- eval


class EvalBatch(NamedTuple):
    """One eval batch; rows with valid=False (a black image) are padding (index -1) or unreadable samples (index >= 0)."""

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    patient_id: torch.Tensor
    keys: list[str]


@dataclass(frozen=True)
class _EvalPlan:
    urls: list[str]
    counts: list[int]
    rank_start: int
    rank_samples: int
    batch_ranges: list[tuple[int, int]]
    batch_size: int
    image_size: int


class EvalStream(IterableDataset):
    """One rank's eval stream: batches first..last-1 of the rank's range go to worker w, in order."""

    def __init__(self, plan: _EvalPlan, transform: Transform, normalize: GrayToNormalizedRGB | None, stats: LoaderStats):
        super().__init__()
        self.plan, self.transform, self.normalize, self.stats = plan, transform, normalize, stats

    def _pad(self) -> torch.Tensor:
        probe = torch.zeros((1, self.plan.image_size, self.plan.image_size), dtype=torch.uint8)
        return torch.zeros_like(self.transform(probe))

    def __iter__(self) -> Iterator[EvalBatch]:
        p, slot = self.plan, _worker_slot()
        first, last = p.batch_ranges[slot]
        B = p.batch_size
        lo = min(first * B, p.rank_samples)
        hi = min(last * B, p.rank_samples)
        segments = _ring_segments(p.counts, list(range(len(p.counts))), p.rank_start + lo, hi - lo) if hi > lo else iter(())
        items = _read_segments(p.urls, segments, self.stats, slot)
        pad: torch.Tensor | None = None
        for b in range(first, last):
            images, labels = [], torch.zeros((B, NUM_LABELS), dtype=torch.float32)
            valid = torch.zeros(B, dtype=torch.bool)
            index = torch.full((B,), -1, dtype=torch.int64)
            patient = torch.full((B,), -1, dtype=torch.int64)
            keys = [""] * B
            for row in range(B):
                position = b * B + row
                if position >= p.rank_samples:
                    images.append(None)
                    continue
                index[row] = p.rank_start + position
                item = next(items)
                if item is None:
                    images.append(None)
                    continue
                keys[row] = item["__key__"]
                try:
                    decoded = _decode(item, self.transform)
                except Exception as exc:
                    self.stats.add(slot)
                    _report_skip(f"{item['__key__']} in {item['__url__']}", exc)
                    images.append(None)
                    continue
                images.append(decoded.image)
                labels[row] = decoded.labels
                valid[row] = True
                patient[row] = int(decoded.meta.get("patient_id", -1))
                pad = torch.zeros_like(decoded.image) if pad is None else pad
            if any(image is None for image in images):
                pad = self._pad() if pad is None else pad
                images = [pad if image is None else image for image in images]
            yield EvalBatch(_collate(images, self.normalize), labels, valid, index, patient, keys)


# ---------------------------------------------------------------- loaders


class ShardLoader:
    """An iterable over one epoch (train) or one pass (eval) that yields exactly `len()` batches.

    Not a DataLoader on purpose: `accelerator.prepare` passes it through untouched (it must not be
    re-sharded; ranks are already split). `skipped` counts samples lost to unreadable data so far.
    `normalize` finishes the images of a batch: identity, or (built with normalize_in_loader=False)
    the uint8 [B,1,H,W] -> float [B,3,H,W] normalization, run on the device after the transfer
    (`loader.normalize(images.to(device))`; it follows its input's device).
    """

    def __init__(self, loader: DataLoader, num_batches: int, stats: LoaderStats, what: str, normalize: torch.nn.Module):
        self.loader, self.num_batches, self.stats, self.what = loader, num_batches, stats, what
        self.normalize = normalize

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    def __iter__(self) -> Iterator[Any]:
        produced = 0
        for batch in self.loader:
            produced += 1
            yield batch
        if produced != self.num_batches:
            raise ChexdistError(f"{self.what}: produced {produced} batches instead of {self.num_batches}; ranks would desynchronize")


def _check_args(batch_size: int, num_workers: int, world_size: int, rank: int) -> None:
    if batch_size < 1:
        raise ChexdistError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ChexdistError(f"num_workers must be >= 0, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ChexdistError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def _dataloader(dataset: IterableDataset, num_workers: int, pin_memory: bool, multiprocessing_context: str | None) -> DataLoader:
    """A DataLoader that draws its worker base seed from its own generator, not the global torch RNG."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=pin_memory,
        multiprocessing_context=multiprocessing_context if num_workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _stages(transform: Transform, normalize_in_loader: bool) -> tuple[Transform, GrayToNormalizedRGB | None, torch.nn.Module]:
    """(per-image part, per-batch normalization in the loader, normalization left to the consumer)."""
    try:
        per_image, normalize = split_normalization(transform)
    except ChexdistError:
        if not normalize_in_loader:
            raise
        return transform, None, torch.nn.Identity()
    if normalize_in_loader:
        return per_image, normalize, torch.nn.Identity()
    return per_image, None, normalize


def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def build_train_loader(
    shard_dir: str | os.PathLike,
    batch_size: int,
    transform: Transform,
    num_workers: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 1000,
    max_batches: int = 0,
    *,
    manifest: dict | None = None,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    normalize_in_loader: bool = True,
) -> tuple[ShardLoader, int]:
    """The train loader of one epoch for one rank: (loader, num_batches), num_batches equal on all ranks.

    num_batches = ceil(train samples / (batch_size * world_size)) (capped by max_batches > 0), from
    the manifest alone. The epoch's shard order is a permutation seeded by (seed, epoch), rotated by
    a seeded offset, and read as one ring of sample positions; rank r's worker w takes the next
    batches[w] * batch_size positions of that ring (batches[w] = its round-robin share of the rank's
    num_batches), shuffles them in a buffer of `shuffle_buffer`, and decodes them. Every sample is
    thus read once per epoch (the ceil wraps a few from the ring's start), with any shard count and
    any world_size * num_workers. A sample that cannot be read or decoded is counted
    (`loader.skipped`), logged, and replaced by the next ring position, so batch counts never change
    and DDP cannot hang. All batches are full: (images float [B,3,H,W], labels float [B,14]).

    Deterministic in (seed, epoch, rank, num_workers, world_size, batch_size): shuffling and
    augmentation use their own RNG streams (the global torch RNG is left untouched), so re-creating
    the loader for epoch e after a restart yields the same batches as an uninterrupted run.

    normalize_in_loader=False: workers stop before normalization and batches carry uint8
    [B,1,H,W]; apply `loader.normalize` on the device (12x less data through IPC and PCIe).
    pin_memory / multiprocessing_context are passed to the DataLoader.
    """
    _check_args(batch_size, num_workers, world_size, rank)
    if seed < 0 or epoch < 0 or shuffle_buffer < 0 or max_batches < 0:
        raise ChexdistError(f"seed, epoch, shuffle_buffer and max_batches must be >= 0, got {seed}, {epoch}, {shuffle_buffer}, {max_batches}")
    where = os.fspath(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    shards = [s for s in split_shards(manifest, "train", where) if s["samples"] > 0]
    total = sum(s["samples"] for s in shards)
    if total == 0:
        raise ChexdistError(f"{where}: the train split has no samples")
    num_batches = math.ceil(total / (batch_size * world_size))
    if max_batches:
        num_batches = min(num_batches, max_batches)
    workers = max(1, num_workers)
    batches = _split_counts(num_batches, workers)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shards)).tolist()
    offset = int(rng.integers(total))
    starts, position = [], offset + rank * num_batches * batch_size
    for count in batches:
        starts.append(position)
        position += count * batch_size
    seeds = []
    for w in range(workers):
        a, b = np.random.SeedSequence([seed, epoch, rank, w]).generate_state(2, dtype=np.uint64).tolist()
        seeds.append((int(a), int(b) >> 1))
    plan = _TrainPlan(
        urls=[resolve(shard_dir, s["name"]) for s in shards],
        counts=[s["samples"] for s in shards],
        order=order,
        starts=starts,
        batches=batches,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seeds=seeds,
    )
    stats = LoaderStats(workers)
    per_image, in_loader, normalize = _stages(transform, normalize_in_loader)
    dataset = TrainStream(plan, per_image, in_loader, stats)
    loader = _dataloader(dataset, num_workers, pin_memory, multiprocessing_context)
    return ShardLoader(loader, num_batches, stats, f"{where} train rank {rank}", normalize), num_batches


def build_eval_loader(
    shard_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    transform: Transform,
    num_workers: int,
    world_size: int,
    rank: int,
    *,
    manifest: dict | None = None,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    normalize_in_loader: bool = True,
) -> tuple[ShardLoader, int]:
    """One pass over `split` for one rank: (loader, num_batches), num_batches equal on all ranks.

    Contract: the split's samples, numbered 0..N-1 in manifest order (shard by shard), are cut into
    world_size contiguous ranges (sizes differ by at most one); rank r reads only its range.
    Each rank yields num_batches = ceil(ceil(N / world_size) / batch_size) full-size batches
    (EvalBatch: images, labels, valid, index, patient_id, keys); rows past the end of the rank's range
    are padding with valid=False and index=-1, and a sample that cannot be read or decoded is a row
    with valid=False and its real index (counted in `loader.skipped` and logged). With workers the
    batch order interleaves workers, so order results by `index`, not by arrival.

    The engine must: run the model on every batch on every rank (same count everywhere), then
    `accelerator.gather` (not gather_for_metrics) the outputs together with labels, valid, index and
    patient_id, and keep rows where valid is True. Kept indices are then exactly the split's
    readable samples, each once. normalize_in_loader as in :func:`build_train_loader`.
    """
    _check_args(batch_size, num_workers, world_size, rank)
    where = os.fspath(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    shards = split_shards(manifest, split, where)
    total = sum(s["samples"] for s in shards)
    sizes = _split_counts(total, world_size)
    num_batches = math.ceil(max(sizes) / batch_size)
    workers = max(1, num_workers)
    bounds = np.cumsum([0] + _split_counts(num_batches, workers)).tolist()
    kept = [s for s in shards if s["samples"] > 0]
    plan = _EvalPlan(
        urls=[resolve(shard_dir, s["name"]) for s in kept],
        counts=[s["samples"] for s in kept],
        rank_start=sum(sizes[:rank]),
        rank_samples=sizes[rank],
        batch_ranges=[(int(bounds[w]), int(bounds[w + 1])) for w in range(workers)],
        batch_size=batch_size,
        image_size=int(manifest.get("image", {}).get("size") or 512),
    )
    stats = LoaderStats(workers)
    per_image, in_loader, normalize = _stages(transform, normalize_in_loader)
    dataset = EvalStream(plan, per_image, in_loader, stats)
    loader = _dataloader(dataset, num_workers, pin_memory, multiprocessing_context)
    return ShardLoader(loader, num_batches, stats, f"{where} {split} rank {rank}", normalize), num_batches
