"""Reading samples by position: (shard, skip, take) segments -> one item per sample, or None per loss.

A local shard with a matching index (:mod:`chexdist.data.shardindex`) is read with one `os.pread`
per sample, of its image bytes only; labels and patient come from the index. Any other shard (a
stream: http(s), `pipe:`; or a local shard packed without an index) goes through the tar reader
(:func:`chexdist.data.shardformat.iter_tar`) and each sample's json. Both give the same items in the
same order, and a sample that one rejects the other rejects too, so the skip counts agree.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from chexdist.data.samples import decode_gray, image_bytes, parse_labels, read_sample
from chexdist.data.shardformat import dataset_name, describe_stream_error, iter_tar, local_path, resolve, sample_offsets
from chexdist.data.shardindex import ShardIndex, load_index, patient_code
from chexdist.errors import ChexdistError

log = logging.getLogger(__name__)

_LOG_FIRST = 20
_LOG_EVERY = 1000


class LoaderStats:
    """Samples skipped (unreadable shard part, undecodable image, bad json) and shard bytes read, summed over workers.

    Each worker writes only its own slot of shared-memory tensors, so no lock is needed and the
    counts reach the main process under fork and spawn alike. The counts belong to one loader (all
    its passes), so a new loader, e.g. in a reused Ray trial actor, starts from zero.
    """

    def __init__(self, slots: int):
        self.counts = torch.zeros(max(1, slots), dtype=torch.int64).share_memory_()
        self.bytes = torch.zeros(max(1, slots), dtype=torch.int64).share_memory_()
        self.reports = torch.zeros(max(1, slots), dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> int:
        return int(self.counts.sum())

    @property
    def bytes_read(self) -> int:
        return int(self.bytes.sum())

    def skip(self, slot: int, what: str, reason: BaseException | str, n: int = 1) -> None:
        """Count `n` lost samples and log the loss: this loader's first few losses in full, then every
        1000th, so a bad shard can't flood logs."""
        self.counts[slot] += n
        self.reports[slot] += 1
        reported = int(self.reports.sum())
        if reported <= _LOG_FIRST or reported % _LOG_EVERY == 0:
            more = " (further skips are logged every 1000th)" if reported == _LOG_FIRST else ""
            log.warning("skipped %s: %s [%d skipped by this loader]%s", what, reason, self.skipped, more)

    def add_bytes(self, slot: int, n: int) -> None:
        self.bytes[slot] += n


@dataclass(frozen=True)
class Shards:
    """The shards a loader reads: location, sample count, offsets (manifest `offsets`) and dataset of each.

    `mixed`: the shards come from several datasets (a mixture), so patients are namespaced everywhere.
    """

    urls: list[str]
    counts: list[int]
    offsets: list[list[int] | None]
    datasets: list[str]
    mixed: bool = False

    def index(self, shard: int) -> list[int] | None:
        """Sample offsets of a shard: the manifest's, else rebuilt once per process for a local file
        (manifests packed before the index existed); None for a stream, which is read through."""
        if self.offsets[shard] is not None:
            return self.offsets[shard]
        path = local_path(self.urls[shard])
        return _local_offsets(path) if path is not None else None

    def patient(self, shard: int, patient: Any) -> int:
        return patient_code(self.datasets[shard], patient, self.mixed)


@functools.lru_cache(maxsize=4096)
def _local_offsets(path: str) -> list[int] | None:
    try:
        return sample_offsets(path)
    except Exception:
        return None  # unreadable: read through and let read_segments count what is lost


def shards_of(shard_dir: Any, manifest: dict, records: list[dict]) -> Shards:
    """The Shards of manifest `records`; a mixture's records carry their own `url` and `dataset`."""

    def offsets(record: dict) -> list[int] | None:
        found = record.get("offsets")
        return found if isinstance(found, list) and len(found) == record["samples"] else None

    name = dataset_name(manifest)
    return Shards(
        [r.get("url") or resolve(shard_dir, r["name"]) for r in records],
        [r["samples"] for r in records],
        [offsets(r) for r in records],
        [r.get("dataset") or name for r in records],
        bool(manifest.get("mixture")),
    )


class Item:
    """One sample as read: from the index (image bytes + its index row) or from the tar (the sample dict)."""

    __slots__ = ("key", "url", "shard", "_image", "_sample", "_index", "_row")

    def __init__(self, key: str, url: str, shard: int, image: bytes | None = None, sample: dict | None = None,
                 index: ShardIndex | None = None, row: int = 0):
        self.key, self.url, self.shard = key, url, shard
        self._image, self._sample, self._index, self._row = image, sample, index, row

    @classmethod
    def from_sample(cls, sample: dict, shard: int) -> Item:
        return cls(sample["__key__"], sample["__url__"], shard, sample=sample)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(gray uint8 [1,H,W], float labels [14] with NaN unknowns, patient ID); raises what makes the sample a skip."""
        if self._sample is not None:
            gray, labels, meta = read_sample(self._sample)
            return gray, labels, meta.get("patient_id")
        index, row = self._index, self._row
        if row in index.errors:
            raise ChexdistError(index.errors[row])
        return decode_gray(self._image), torch.from_numpy(index.labels[row]), index.patients[row]

    def encoded(self) -> tuple[bytes, torch.Tensor, Any]:
        """As :meth:`read`, but the image still encoded (to be decoded later, e.g. in a batch on the GPU):
        raises what makes the sample a skip, except an undecodable image."""
        if self._sample is not None:
            encoded = image_bytes(self._sample)
            labels, meta = parse_labels(self._sample)
            return encoded, labels, meta.get("patient_id")
        index, row = self._index, self._row
        if row in index.errors:
            raise ChexdistError(index.errors[row])
        return self._image, torch.from_numpy(index.labels[row]), index.patients[row]


def _indexed(shards: Shards, shard: int, index: ShardIndex, skip: int, take: int, read: list[int]) -> Iterator[Item]:
    """Samples skip..skip+take-1 of an indexed local shard, one positioned read of the image bytes each."""
    url = shards.urls[shard]
    fd = os.open(local_path(url), os.O_RDONLY)
    try:
        for row in range(skip, skip + take):
            data = os.pread(fd, int(index.size[row]), int(index.start[row]))
            read[0] += len(data)
            yield Item(index.keys[row], url, shard, image=data, index=index, row=row)
    finally:
        os.close(fd)


def _tar_items(shards: Shards, shard: int, skip: int, take: int, read: list[int]) -> Iterator[Item]:
    def count(n: int) -> None:
        read[0] += n

    offsets = shards.index(shard) if skip else shards.offsets[shard]
    for sample in iter_tar(shards.urls[shard], skip, take, offsets=offsets, on_read=count):
        yield Item.from_sample(sample, shard)


def read_segments(shards: Shards, segments: Iterable[tuple[int, int, int]], stats: LoaderStats, slot: int) -> Iterator[Item | None]:
    """Exactly `take` items per (shard, skip, take) segment: an Item, or None for each one lost."""
    for shard, skip, take in segments:
        got, read = 0, [0]
        url = shards.urls[shard]
        index = load_index(url, shards.counts[shard], shards.offsets[shard])
        try:
            items = _indexed(shards, shard, index, skip, take, read) if index is not None else _tar_items(shards, shard, skip, take, read)
            for item in items:
                got += 1
                yield item
        except Exception as exc:
            reason: BaseException | str = describe_stream_error(exc)
        else:
            reason = "shard ended early (cut or corrupt tar, or fewer samples than its manifest record)"
        finally:
            stats.add_bytes(slot, read[0])
        if got < take:
            lost = take - got
            stats.skip(slot, f"{lost} sample(s) of {url} from position {skip + got}", reason, lost)
            yield from [None] * lost
