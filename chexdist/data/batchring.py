"""Train batches through reused shared-memory segments: each persistent loader worker keeps a ring of them.

A worker that writes every batch into a fresh shared-memory segment pays for it twice: the kernel
zero-fills each page as the worker first touches it (12-16 page faults per 224-px image), and the
training process receives a file descriptor per batch (one connection to the worker's resource
sharer) and maps the segment again. With persistent workers, each worker instead writes its batches
into up to `SLOTS` segments that it keeps. The training process receives a segment's descriptor the
first time only, keeps it mapped, and copies each batch out as it arrives (into pinned memory when it
feeds a GPU, which is the copy the DataLoader's pin thread would make anyway). It then hands the slot
back at once. Any batch it yields is therefore its own memory, whatever the consumer keeps.

Hand-over, one shared uint8 cell per (worker, slot), made by the training process (`ring_flags`):
UNSENT (free; the training process does not hold this segment, so the next batch ships it), BUSY (a
batch in it is on its way), HELD (free; the training process holds it, so only the slot number
travels). The worker sets BUSY before writing. The training process sets HELD after copying. A batch
that PyTorch discards when a pass is cut short (a new `iter(loader)` before the end) never reaches
the copy, so at the start of each pass a worker turns its BUSY cells back to UNSENT: by then the
DataLoader has drained the previous pass. A worker that finds no free slot writes a fresh segment
and ships it the ordinary way, so the ring never waits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from chexdist.labels import NUM_LABELS

SLOTS = 8  # per worker; in steady state a worker uses prefetch_factor + 1 of them
UNSENT, BUSY, HELD = 0, 1, 2
_ALIGN = 64


def ring_flags(workers: int) -> torch.Tensor:
    """The hand-over cells of a loader's workers: uint8 [workers, SLOTS] in shared memory, all UNSENT."""
    return torch.full((workers, SLOTS), UNSENT, dtype=torch.uint8).share_memory_()


def batch_bytes(size: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of a batch buffer, offset of its labels): `size` images of `shape`, then float labels [size, 14]."""
    labels_at = -(-size * math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return labels_at + size * NUM_LABELS * 4, labels_at


def batch_views(storage: torch.UntypedStorage, size: int, shape: tuple[int, ...],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [size, *shape], labels float [size, 14]) as views of one buffer laid out by `batch_bytes`."""
    _, labels_at = batch_bytes(size, shape, dtype)
    images = torch.empty(0, dtype=dtype).set_(storage, 0, (size, *shape))
    labels = torch.empty(0, dtype=torch.float32).set_(storage, labels_at // 4, (size, NUM_LABELS))
    return images, labels


class RingBatch(NamedTuple):
    """What a worker ships for a batch written into its ring: the slot, and the segment itself only when
    the training process does not hold it yet. Plain values otherwise, so a batch costs a short pickle."""

    worker: int
    pid: int
    slot: int
    storage: torch.UntypedStorage | None
    size: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class WorkerRing:
    """A worker's segments and its row of hand-over cells (in the worker process)."""

    def __init__(self, flags: torch.Tensor, worker: int):
        self.flags, self.worker = flags[worker].numpy(), worker
        self.segments: list[torch.UntypedStorage] = []

    def start_pass(self) -> None:
        """Slots left BUSY by a pass cut short were discarded unseen: free them, shipping their segment again."""
        self.flags[self.flags == BUSY] = UNSENT

    def acquire(self, nbytes: int, new_segment: Callable[[int], torch.UntypedStorage]) -> tuple[int, torch.UntypedStorage, bool]:
        """(slot, segment of >= `nbytes` bytes, whether the segment travels with the batch), the slot
        marked BUSY; slot -1 and a fresh `new_segment(nbytes)` when none is free."""
        for slot, segment in enumerate(self.segments):
            state = self.flags[slot]
            if state != BUSY and segment.nbytes() >= nbytes:
                self.flags[slot] = BUSY
                return slot, segment, state == UNSENT
        if len(self.segments) < SLOTS:
            self.segments.append(new_segment(nbytes))
            self.flags[len(self.segments) - 1] = BUSY
            return len(self.segments) - 1, self.segments[-1], True
        return -1, new_segment(nbytes), True

    def ship(self, slot: int, send: bool, images: torch.Tensor) -> RingBatch:
        """The batch just written into `slot` (its images view; the labels follow from the layout)."""
        return RingBatch(self.worker, os.getpid(), slot, self.segments[slot] if send else None, images.shape[0],
                         tuple(images.shape[1:]), images.dtype)


class RingReceiver:
    """The training process's side: the segments it holds, and the copy out of each batch."""

    def __init__(self, flags: torch.Tensor, pin: bool = False):
        self.flags, self.pin = flags.numpy(), pin
        self.held: dict[tuple[int, int], torch.UntypedStorage] = {}

    def take(self, batch: RingBatch | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of a worker's batch, in memory of this process; the slot goes back to the worker."""
        if not isinstance(batch, RingBatch):
            return tuple(t.pin_memory() for t in batch) if self.pin else batch
        key = (batch.pid, batch.slot)
        if batch.storage is not None:
            self.held[key] = batch.storage
        nbytes, _ = batch_bytes(batch.size, batch.shape, batch.dtype)
        out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        out.copy_(torch.empty(0, dtype=torch.uint8).set_(self.held[key], 0, (nbytes,)))
        self.flags[batch.worker, batch.slot] = HELD
        return batch_views(out.untyped_storage(), batch.size, batch.shape, batch.dtype)
