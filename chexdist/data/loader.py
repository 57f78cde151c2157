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

A reader that starts inside a shard opens it at its first sample, given the manifest's per-shard
`offsets`: a local shard by seeking, an ``http(s)://`` shard with an HTTP Range request that also
ends at the reader's last sample (a server that ignores Range answers 200: that reader reads the
prefix and discards it, counted in bytes read, with one warning per host and process), and a
``pipe:`` template holding ``{offset}`` by streaming from that byte
(``pipe:gsutil cat -r {offset}- gs://B/nih/{name}``). Other ``pipe:`` commands read from the
shard's start (see :func:`chexdist.data.shardformat.iter_tar`).

Sample positions, not whole shards, are divided among ranks and workers, planned here from the
manifest counts: webdataset's split_by_node / split_by_worker split by shard, so they cannot give
every rank the same number of samples, and DDP would then hang (a rank waits in a collective another
rank never reaches) or drop data. Planning positions works with any number of shards, ranks and
workers. A reader starts at its first sample (above); each train batch is seeded on its own, so a
loader can start at any batch without decoding the ones before it. Train: see :func:`build_train_loader`.
Eval: see :func:`build_eval_loader` for the padding/mask contract.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from chexdist.errors import ChexdistError
from chexdist.labels import NUM_LABELS
from chexdist.data.decode import BatchDecoder, EncodedRows, batch_decode_device
from chexdist.data.mixture import Chunk, load_sources, ring_segments, shares, source_list, weighted_chunks
from chexdist.data.reader import Item, LoaderStats, Shards, read_segments, shards_of
from chexdist.data.shardformat import split_shards
from chexdist.utils.stopsignals import blocked, serve_through_stop_signals
from chexdist.data.transforms import GrayToNormalizedRGB, split_normalization
from chexdist.data.batchaug import generator_for
from chexdist.data.batchring import RingBatch, RingReceiver, WorkerRing, batch_bytes, batch_views, ring_flags

AUGMENT_STREAM = 0x6175670A  # first seed word of the per-batch device augmentation, apart from the workers' streams

Transform = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- workers and batches


def _worker_slot() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _worker_init(worker_id: int) -> None:
    """Decode is per sample: one thread per worker avoids oversubscribing the cores. The stop signals
    are the training process's to act on: the worker keeps serving until the loader shuts it down."""
    torch.set_num_threads(1)
    serve_through_stop_signals()


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in a worker it lives in shared memory, so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    except AttributeError:
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_images(images: list[torch.Tensor], normalize: GrayToNormalizedRGB | None) -> torch.Tensor:
    """Stack per-image outputs; with `normalize`, stack uint8 and normalize the batch in one pass.

    Normalizing per batch, straight into the output buffer, saves a float copy of every image.
    """
    first = images[0]
    if normalize is None:
        return torch.stack(images, out=_empty((len(images), *first.shape), first.dtype))
    gray = torch.stack(images).to(torch.float32)
    out = _empty((len(images), normalize.scale.shape[0], *first.shape[-2:]), torch.float32)
    return torch.mul(gray, normalize.scale, out=out).add_(normalize.shift)


# ---------------------------------------------------------------- the ring of train positions


def seed_words(*key: int) -> np.ndarray:
    """Four 32-bit words drawn from numpy's SeedSequence of `key` (independent streams per key)."""
    return np.random.SeedSequence(list(key)).generate_state(4)


@contextlib.contextmanager
def seeded(words: np.ndarray) -> Iterator[None]:
    """Run a block with torch's, Python's and NumPy's global generators seeded from `words`, then put
    all three back: a transform may draw from any of them, and the caller's streams stay untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone (what fork_rng saves): torch.manual_seed also seeds every accelerator, 100 us a batch.
        torch.default_generator.manual_seed(int(words[0]) << 32 | int(words[1]))
        random.seed(int(words[2]) << 32 | int(words[3]))
        np.random.seed(words)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass(frozen=True)
class _TrainPlan:
    """Everything one rank's streams need for any epoch; plain data so the dataset pickles for any start method.

    `sources`/`share`: a weighted mixture's shards per source and samples per epoch (None: unweighted)."""

    shards: Shards
    batches: list[int]
    batch_size: int
    shuffle_buffer: int
    seed: int
    rank: int
    num_batches: int
    sources: list[list[int]] | None = None
    share: list[int] | None = None

    def ring(self, epoch: int) -> tuple[list[Chunk], list[int]]:
        """(the epoch's ring as chunks, ring start of each worker): a (seed, epoch) permutation of the
        shards (see `chexdist.data.mixture` for weights), rotated by a seeded offset; this rank's
        workers take consecutive ranges of it."""
        counts = self.shards.counts
        rng = np.random.default_rng([self.seed, epoch])
        if self.sources is None:
            chunks = [(s, 0, counts[s]) for s in rng.permutation(len(counts)).tolist()]
        else:
            chunks = weighted_chunks(counts, self.sources, self.share, rng)
        position = int(rng.integers(sum(take for _, _, take in chunks))) + self.rank * self.num_batches * self.batch_size
        starts = []
        for count in self.batches:
            starts.append(position)
            position += count * self.batch_size
        return chunks, starts


def _new_segment(nbytes: int) -> torch.UntypedStorage:
    return _empty((nbytes,), torch.uint8).untyped_storage()


class _Batch:
    """One batch collated in place: rows written straight into a preallocated (shared-memory) uint8 buffer
    that holds the labels too (one segment per batch, so the training process receives one file
    descriptor per batch, not two), or into a segment of the worker's ring (`chexdist.data.batchring`)."""

    def __init__(self, size: int, normalize: GrayToNormalizedRGB | None, ring: WorkerRing | None = None):
        self.size, self.normalize, self.ring = size, normalize, ring
        self.images: torch.Tensor | None = None
        self.labels = torch.zeros((size, NUM_LABELS), dtype=torch.float32)  # until the first row gives the shape
        self.slot, self.send = -1, True

    def put(self, row: int, image: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if self.images is None or self.images.shape[1:] != image.shape:
            if self.images is not None:
                raise ChexdistError(f"the transform gave images of shape {tuple(self.images.shape[1:])} and {tuple(image.shape)} "
                                    "in one batch; it must end in a fixed size (resize/crop)")
            self._allocate(tuple(image.shape), image.dtype)
        self.images[row] = image
        if labels is not None:
            self.labels[row] = labels

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        nbytes, _ = batch_bytes(self.size, shape, dtype)
        if self.ring is None:
            storage = _new_segment(nbytes)
        else:
            self.slot, storage, self.send = self.ring.acquire(nbytes, _new_segment)
        self.images, self.labels = batch_views(storage, self.size, shape, dtype)
        self.labels.zero_()

    def finish(self) -> torch.Tensor:
        """The batch's images; with `normalize`, normalized in one pass straight into the output buffer."""
        if self.normalize is None:
            return self.images
        out = _empty((self.size, self.normalize.scale.shape[0], *self.images.shape[-2:]), torch.float32)
        return torch.mul(self.images.to(torch.float32), self.normalize.scale, out=out).add_(self.normalize.shift)

    def shipped(self) -> RingBatch | tuple[torch.Tensor, torch.Tensor]:
        """What the worker yields: the ring slot's hand-over, or (images, labels)."""
        if self.slot >= 0:
            return self.ring.ship(self.slot, self.send, self.images)
        return self.finish(), self.labels


class TrainStream(IterableDataset):
    """One rank's train stream from batch `position[1]` of epoch `position[0]` (shared memory, so
    persistent workers see each epoch the main process sets).

    Batch i of the rank belongs to worker i % W as its batch i // W. Starting at batch k, DataLoader
    worker d plays worker (d + k) % W: the DataLoader's round robin from worker 0 then yields batches
    k, k+1, ... in the uninterrupted order. Within a worker, the shuffle-buffer permutation of its ring
    range is computed on positions, not samples, and every batch seeds its augmentation from (seed,
    epoch, rank, worker, batch), so a batch's content depends on nothing read before it: starting at
    batch k reads from the first position batches >= k need, and decodes nothing it skips.
    """

    def __init__(self, plan: _TrainPlan, transform: Transform, normalize: GrayToNormalizedRGB | None,
                 stats: LoaderStats, position: torch.Tensor, ship_bytes: bool = False, ring: torch.Tensor | None = None):
        super().__init__()
        self.plan, self.transform, self.normalize, self.stats, self.position = plan, transform, normalize, stats, position
        self.ship_bytes = ship_bytes  # batches of encoded images, decoded by the main process (chexdist.data.decode)
        self.ring = ring  # the workers' hand-over cells (chexdist.data.batchring), None: a fresh segment per batch
        self.worker_ring: WorkerRing | None = None  # made in the worker process, kept across its passes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p, B = self.plan, self.plan.batch_size
        epoch, start_batch = (int(v) for v in self.position)
        workers = len(p.batches)
        slot = _worker_slot()
        ring = self._worker_ring(slot)
        worker = (slot + start_batch) % workers
        first = max(0, -(-(start_batch - worker) // workers))
        if first >= p.batches[worker]:
            return
        chunks, starts = p.ring(epoch)
        budget = p.batches[worker] * B
        shuffle_seed = int(seed_words(p.seed, epoch, p.rank, worker)[0])
        perm = list(shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=random.Random(shuffle_seed))(iter(range(budget))))
        wanted = perm[first * B:]
        needed = bytearray(budget)
        for q in wanted:
            needed[q] = 1
        lowest = min(wanted)
        segments = ring_segments(chunks, starts[worker] + lowest, budget - lowest)
        reader = enumerate(read_segments(p.shards, segments, self.stats, slot), start=lowest)
        pending: dict[int, Item | None] = {}
        for b in range(first, p.batches[worker]):
            words = seed_words(p.seed, epoch, p.rank, worker, b)
            batch = EncodedRows(B, words) if self.ship_bytes else _Batch(B, self.normalize, ring)
            with seeded(words):
                for row, j in enumerate(range(b * B, (b + 1) * B)):
                    while perm[j] not in pending:
                        q, item = next(reader)
                        if needed[q]:
                            pending[q] = item
                    decoded = self._decode(pending.pop(perm[j]), slot)
                    if decoded is None:
                        decoded = self._replacement(chunks, starts[worker] + budget + j, slot)
                    batch.put(row, *decoded)
            yield (batch.finish(), batch.labels) if self.ship_bytes else batch.shipped()

    def _worker_ring(self, slot: int) -> WorkerRing | None:
        if self.ring is None or get_worker_info() is None:
            return None
        if self.worker_ring is None:
            self.worker_ring = WorkerRing(self.ring, slot)
        self.worker_ring.start_pass()
        return self.worker_ring

    def _decode(self, item: Item | None, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if item is None:
            return None
        try:
            if self.ship_bytes:
                return item.encoded()[:2]
            gray, labels, _ = item.read()
            return self.transform(gray), labels
        except Exception as exc:
            self.stats.skip(slot, f"{item.key} in {item.url}", exc)
            return None

    def _replacement(self, chunks: list[Chunk], ring_position: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first decodable sample from `ring_position` on (another worker's range); a fixed place
        per output slot, so a replacement does not shift later batches."""
        total = sum(take for _, _, take in chunks)
        candidates = read_segments(self.plan.shards, ring_segments(chunks, ring_position, total), self.stats, slot)
        with contextlib.closing(candidates):
            for item in candidates:
                decoded = self._decode(item, slot)
                if decoded is not None:
                    return decoded
        raise ChexdistError(
            f"train split ({len(self.plan.shards.counts)} shards, e.g. {self.plan.shards.urls[0]}): no decodable sample in a full "
            "pass over the split; see the warnings above"
        )


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
    shards: Shards
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
        chunks = [(s, 0, n) for s, n in enumerate(p.shards.counts)]
        items = read_segments(p.shards, ring_segments(chunks, p.rank_start + lo, hi - lo) if hi > lo else iter(()), self.stats, slot)
        pad: torch.Tensor | None = None
        for b in range(first, last):
            batch, empty = _Batch(B, self.normalize), []
            valid = torch.zeros(B, dtype=torch.bool)
            index = torch.full((B,), -1, dtype=torch.int64)
            patient = torch.full((B,), -1, dtype=torch.int64)
            keys = [""] * B
            for row in range(B):
                position = b * B + row
                item = None
                if position < p.rank_samples:
                    index[row] = p.rank_start + position
                    item = next(items)
                decoded = self._decode(item, slot) if item is not None else None
                if decoded is None:
                    empty.append(row)
                    keys[row] = item.key if item is not None else ""
                    continue
                keys[row], (image, labels, patient[row]) = item.key, decoded
                batch.put(row, image, labels)
                valid[row] = True
                pad = torch.zeros_like(image) if pad is None else pad
            if empty:
                pad = self._pad() if pad is None else pad
                for row in empty:
                    batch.put(row, pad)
            yield EvalBatch(batch.finish(), batch.labels, valid, index, patient, keys)

    def _decode(self, item: Item, slot: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        try:
            gray, labels, patient = item.read()
            return self.transform(gray), labels, self.plan.shards.patient(item.shard, patient)
        except Exception as exc:
            self.stats.skip(slot, f"{item.key} in {item.url}", exc)
            return None


# ---------------------------------------------------------------- loaders


class ShardLoader:
    """An iterable over one epoch (train) or one pass (eval) that yields exactly `len()` batches.

    Not a DataLoader on purpose: `accelerate.prepare` passes it through untouched (it must not be
    re-sharded; ranks are already split). `skipped` counts samples lost to unreadable data so far,
    `bytes_read` the shard bytes read so far (both summed over workers, over all passes).
    `normalize` finishes the images of a batch: identity, or (built with normalize_in_loader=False)
    the uint8 [B,1,H,W] -> float [B,3,H,W] normalization, run on the device after the transfer
    (`loader.normalize(images.to(device))`; it follows its input's device).
    A train loader is re-pointed with `set_epoch(epoch, start_batch)` before each pass; its
    (persistent) workers read the new position from shared memory when the pass starts.
    """

    def __init__(self, loader: DataLoader, num_batches: int, stats: LoaderStats, what: str, normalize: torch.nn.Module,
                 position: torch.Tensor | None = None, decode: Callable[[Any], Any] | None = None,
                 ring: RingReceiver | None = None):
        self.loader, self.num_batches, self.stats, self.what = loader, num_batches, stats, what
        self.normalize, self.position, self.decode, self.ring = normalize, position, decode, ring
        self.augment: torch.nn.Module | None = None
        self.augment_key: tuple[int, int] = (0, 0)

    def finish(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """Batch `index` of the epoch (0-based, counted from the epoch's start) as the model sees it,
        `images` already on the device: `normalize`, or with a batch augmentation
        (build_train_loader(batch_augment=...)) that module, its parameters drawn from a generator
        seeded by (seed, epoch, rank, index) alone, so a resumed epoch augments batch k as an
        unbroken one does."""
        if self.augment is None:
            return self.normalize(images)
        seed, rank = self.augment_key
        return self.augment(images, generator_for(seed_words(AUGMENT_STREAM, seed, int(self.position[0]), rank, index)))

    @property
    def start_batch(self) -> int:
        return int(self.position[1]) if self.position is not None else 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self.position is None:
            raise ChexdistError(f"{self.what}: only a train loader has epochs")
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ChexdistError(f"{self.what}: epoch {epoch} / start_batch {start_batch} out of range (0..{self.num_batches})")
        self.position[0], self.position[1] = epoch, start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    @property
    def bytes_read(self) -> int:
        return self.stats.bytes_read

    def __iter__(self) -> Iterator[Any]:
        expected, produced = len(self), 0
        if expected == 0:
            return
        for batch in _start_workers(self.loader):
            produced += 1
            if self.ring is not None:
                batch = self.ring.take(batch)
            yield batch if self.decode is None else self.decode(batch)
        if produced != expected:
            raise ChexdistError(f"{self.what}: produced {produced} batches instead of {expected}; ranks would desynchronize")


def _start_workers(loader: DataLoader) -> Iterator[Any]:
    """iter(loader), its workers (and multiprocessing's forkserver) started with the stop signals blocked
    until `_worker_init` takes them over (see `chexdist.utils.stopsignals`). multiprocessing's resource tracker
    (spawn, forkserver) is started first, in a block of its own: once started, it unblocks SIGINT and
    SIGTERM in the thread that started it."""
    context = loader.multiprocessing_context or multiprocessing
    if loader.num_workers and context.get_start_method() != "fork":
        from multiprocessing import resource_tracker

        with blocked():
            resource_tracker.ensure_running()
    with blocked():
        return iter(loader)


def _check_args(batch_size: int, num_workers: int, world_size: int, rank: int) -> None:
    if batch_size < 1:
        raise ChexdistError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ChexdistError(f"num_workers must be >= 0, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ChexdistError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")


def _dataloader(dataset: IterableDataset, num_workers: int, pin_memory: bool, multiprocessing_context: str | None,
                seed_key: tuple[int, ...], persistent_workers: bool) -> DataLoader:
    """A DataLoader whose workers' torch, Python and NumPy generators start from `seed_key` (torch seeds
    all three from the generator's base seed + worker id), not from the global torch RNG or a constant."""
    words = seed_words(*seed_key)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=pin_memory,
        multiprocessing_context=multiprocessing_context if num_workers else None,
        generator=torch.Generator().manual_seed((int(words[0]) << 31) | (int(words[1]) >> 1)),
        persistent_workers=persistent_workers and num_workers > 0,
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


def _where(shard_dir: Any) -> str:
    return " + ".join(source_list(shard_dir))


def _weighting(manifest: dict, records: list[dict]) -> dict[str, Any]:
    """The _TrainPlan fields of a weighted mixture: shards per source and each source's epoch share."""
    described = manifest.get("mixture", {}).get("sources", [])
    if not described or described[0].get("weight") is None:
        return {}
    sources: list[list[int]] = [[] for _ in described]
    for i, record in enumerate(records):
        sources[record["source"]].append(i)
    sizes = [sum(records[i]["samples"] for i in own) for own in sources]
    empty = [d["shards"] for d, n in zip(described, sizes) if n == 0]
    if empty:
        raise ChexdistError(f"{empty[0]}: a weighted source with no train samples; drop it from data.shards or repack it")
    return {"sources": sources, "share": shares(sizes, [d["weight"] for d in described])}


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
    start_batch: int = 0,
    manifest: dict | None = None,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    normalize_in_loader: bool = True,
    persistent_workers: bool = False,
    shard_weights: list[float] | None = None,
    batch_augment: torch.nn.Module | None = None,
    decode_device: str | torch.device = "cpu",
) -> tuple[ShardLoader, int]:
    """The train loader of one rank: (loader, num_batches), num_batches equal on all ranks and epochs.

    num_batches = ceil(train samples / (batch_size * world_size)) (capped by max_batches > 0), from
    the manifest alone. The epoch's shard order is a permutation seeded by (seed, epoch), rotated by
    a seeded offset, and read as one ring of sample positions; rank r's worker w takes the next
    batches[w] * batch_size positions of that ring (batches[w] = its round-robin share of the rank's
    num_batches), shuffles them in a buffer of `shuffle_buffer`, and decodes them. Every sample is
    thus read once per epoch (the ceil wraps a few from the ring's start), with any shard count and
    any world_size * num_workers. A sample that cannot be read or decoded is counted
    (`loader.skipped`), logged, and replaced by a sample from a fixed ring position further on, so
    batch counts never change and DDP cannot hang. All batches are full: (images float [B,3,H,W],
    labels float [B,14]).

    Deterministic in (seed, epoch, rank, num_workers, world_size, batch_size): each batch's
    augmentation draws from torch, Python and NumPy generators seeded by (seed, epoch, rank, worker,
    batch) (the caller's global generators are left untouched), so the loader can start at any batch:
    `start_batch=k` (or `loader.set_epoch(epoch, k)`) yields batches k..num_batches-1 exactly as an
    uninterrupted pass would, without decoding the first k. Local shards are opened at each reader's
    first sample (the manifest's offset index, or one rebuilt from the tar headers), and so are
    streams whose template holds ``{offset}`` (the manifest's index); other streams (pipe:, http) are
    read from their start.

    normalize_in_loader=False: workers stop before normalization and batches carry uint8
    [B,1,H,W]; apply `loader.normalize` on the device (12x less data through IPC and PCIe).
    batch_augment (with normalize_in_loader=False and a deterministic `transform`, e.g.
    `chexdist.data.transforms.load_transform`): `loader.finish(images, k)` applies it to batch k on
    the device instead of `normalize` (`chexdist.data.batchaug`), seeded per batch.
    persistent_workers keeps the workers across epochs: build once, then `loader.set_epoch(e, k)`
    before each pass. pin_memory / multiprocessing_context are passed to the DataLoader.
    decode_device: `data.decode_device` (see :mod:`chexdist.data.decode`: "cuda" decodes JPEG batches
    in the main process with nvJPEG, falling back to "cpu" without CUDA), or a torch.device to decode there.
    """
    _check_args(batch_size, num_workers, world_size, rank)
    if seed < 0 or epoch < 0 or shuffle_buffer < 0 or max_batches < 0:
        raise ChexdistError(f"seed, epoch, shuffle_buffer and max_batches must be >= 0, got {seed}, {epoch}, {shuffle_buffer}, {max_batches}")
    where = _where(shard_dir)
    manifest = manifest if manifest is not None else load_sources(shard_dir, shard_weights)
    records = [s for s in split_shards(manifest, "train", where) if s["samples"] > 0]
    total = sum(s["samples"] for s in records)
    if total == 0:
        raise ChexdistError(f"{where}: the train split has no samples")
    num_batches = math.ceil(total / (batch_size * world_size))
    if max_batches:
        num_batches = min(num_batches, max_batches)
    plan = _TrainPlan(
        shards=shards_of(shard_dir, manifest, records),
        batches=_split_counts(num_batches, max(1, num_workers)),
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        num_batches=num_batches,
        **_weighting(manifest, records),
    )
    device = batch_decode_device(decode_device, manifest)
    stats = LoaderStats(num_workers + (device is not None))  # the main process's own slot when it decodes
    position = torch.zeros(2, dtype=torch.int64).share_memory_()
    per_image, in_loader, normalize = _stages(transform, normalize_in_loader)
    flags = ring_flags(num_workers) if num_workers and persistent_workers and device is None and in_loader is None else None
    dataset = TrainStream(plan, per_image, in_loader, stats, position, ship_bytes=device is not None, ring=flags)
    loader = _dataloader(dataset, num_workers, pin_memory and flags is None, multiprocessing_context, (seed, epoch, rank),
                         persistent_workers)
    decode = BatchDecoder(per_image, in_loader, device, stats, num_workers) if device is not None else None
    ring = RingReceiver(flags, pin=pin_memory) if flags is not None else None  # it pins, in place of the DataLoader
    shard_loader = ShardLoader(loader, num_batches, stats, f"{where} train rank {rank}", normalize, position, decode, ring)
    _attach_augment(shard_loader, batch_augment, normalize_in_loader, seed, rank)
    shard_loader.set_epoch(epoch, start_batch)
    return shard_loader, num_batches


def _attach_augment(loader: ShardLoader, augment: torch.nn.Module | None, normalize_in_loader: bool, seed: int,
                    rank: int) -> None:
    if augment is None:
        return
    if normalize_in_loader:
        raise ChexdistError("batch_augment needs normalize_in_loader=False: it starts from the uint8 batch")
    loader.augment, loader.augment_key = augment, (seed, rank)


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
    persistent_workers: bool = False,
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
    readable samples, each once. The loader can be iterated again for another identical pass
    (persistent_workers keeps its workers between passes); normalize_in_loader as in
    :func:`build_train_loader`.
    """
    _check_args(batch_size, num_workers, world_size, rank)
    where = _where(shard_dir)
    manifest = manifest if manifest is not None else load_sources(shard_dir)
    shards = split_shards(manifest, split, where)
    total = sum(s["samples"] for s in shards)
    sizes = _split_counts(total, world_size)
    num_batches = math.ceil(max(sizes) / batch_size)
    workers = max(1, num_workers)
    bounds = np.cumsum([0] + _split_counts(num_batches, workers)).tolist()
    kept = [s for s in shards if s["samples"] > 0]
    plan = _EvalPlan(
        shards=shards_of(shard_dir, manifest, kept),
        rank_start=sum(sizes[:rank]),
        rank_samples=sizes[rank],
        batch_ranges=[(int(bounds[w]), int(bounds[w + 1])) for w in range(workers)],
        batch_size=batch_size,
        image_size=int(manifest.get("image", {}).get("size") or 512),
    )
    stats = LoaderStats(workers)
    per_image, in_loader, normalize = _stages(transform, normalize_in_loader)
    dataset = EvalStream(plan, per_image, in_loader, stats)
    loader = _dataloader(dataset, num_workers, pin_memory, multiprocessing_context, (rank,), persistent_workers)
    return ShardLoader(loader, num_batches, stats, f"{where} {split} rank {rank}", normalize), num_batches
