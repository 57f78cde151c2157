"""Persistent workers hand batches over through a ring of reused shared-memory segments
(`chexdist.data.batchring`): the batches equal the fresh-segment path's, stay intact however many the
consumer keeps, reuse a few segments, and a pass cut short gives its slots back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chexdist.data.batchring import BUSY, HELD, SLOTS, UNSENT, RingBatch, RingReceiver, WorkerRing, ring_flags
from chexdist.data.loader import build_train_loader
from tests.test_data import AUGMENT, batches_of, same_batches, write_shards

LAYOUT = {"train": [9, 14, 5, 12], "val": [3], "test": [1]}  # 40 train samples: 10 batches of 4 per epoch
WORKERS, BATCH = 2, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ring")
    write_shards(root, LAYOUT)
    return root


def build(root: Path, epoch: int = 0, start: int = 0, persistent: bool = True):
    loader, _ = build_train_loader(root, BATCH, AUGMENT, WORKERS, 1, 0, seed=3, epoch=epoch, shuffle_buffer=8,
                                   start_batch=start, normalize_in_loader=False, persistent_workers=persistent)
    return loader


def reference(root: Path, epoch: int, start: int = 0) -> list:
    """The same batches through fresh segments (no ring without persistent workers)."""
    loader = build(root, epoch, start, persistent=False)
    assert loader.ring is None
    return batches_of(loader)


def count_arrivals(loader) -> dict[str, int]:
    """Counts what reaches the training process: batches with their segment, with a slot number only, or
    in a fresh segment (the ring had no free slot)."""
    seen = {"segment": 0, "slot": 0, "fresh": 0}
    take = loader.ring.take

    def counted(batch):
        if isinstance(batch, RingBatch):
            seen["segment" if batch.storage is not None else "slot"] += 1
        else:
            seen["fresh"] += 1
        return take(batch)

    loader.ring.take = counted
    return seen


def test_kept_batches_equal_the_fresh_segment_batches(shards):
    """The consumer keeps every batch it got (no clone): none is overwritten by a later one."""
    loader = build(shards)
    assert loader.ring is not None
    kept, expected = [], []
    for epoch, start in ((0, 0), (1, 3), (2, 0)):
        loader.set_epoch(epoch, start)
        kept += list(loader)
        expected += reference(shards, epoch, start)
    assert len(kept) == 10 + 7 + 10
    assert same_batches(kept, expected)


@pytest.mark.parametrize("world_size,workers,batch", [(2, 3, 2), (3, 2, 3)])
def test_every_rank_and_worker_layout_equals_the_fresh_segment_path(shards, world_size, workers, batch):
    for rank in range(world_size):
        def loader(persistent: bool, start: int = 0):
            built, _ = build_train_loader(shards, batch, AUGMENT, workers, world_size, rank, seed=7, epoch=2, shuffle_buffer=5,
                                          start_batch=start, normalize_in_loader=False, persistent_workers=persistent)
            assert (built.ring is not None) == persistent
            return batches_of(built)

        full = loader(False)
        assert same_batches(loader(True), full)
        assert same_batches(loader(True, len(full) // 2), full[len(full) // 2:])


def test_workers_reuse_a_few_segments(shards):
    loader = build(shards)
    seen = count_arrivals(loader)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for images, labels in loader:
            pass
    assert seen["fresh"] == 0
    assert seen["segment"] <= WORKERS * 3  # prefetch_factor 2 in flight + 1 being written, per worker
    assert seen["slot"] == 30 - seen["segment"]


def test_a_pass_cut_short_gives_its_slots_back(shards):
    loader = build(shards)
    seen = count_arrivals(loader)
    for epoch in range(2 * SLOTS):
        loader.set_epoch(epoch)
        batches = iter(loader)
        next(batches), next(batches)
        del batches  # the DataLoader discards what was in flight when the next pass starts
    loader.set_epoch(2 * SLOTS)
    assert same_batches(batches_of(loader), reference(shards, 2 * SLOTS))
    assert seen["fresh"] == 0  # the discarded batches' slots came back


def test_worker_ring_hand_over():
    flags = ring_flags(2)
    ring = WorkerRing(flags, 1)
    new = lambda n: torch.empty(n, dtype=torch.uint8).untyped_storage()  # noqa: E731
    slot, segment, send = ring.acquire(100, new)
    assert (slot, send) == (0, True) and flags[1, 0] == BUSY and flags[0].eq(UNSENT).all()
    flags[1, 0] = HELD
    assert ring.acquire(80, new)[::2] == (0, False)  # held by the training process: the slot number travels alone
    flags[1, 0] = HELD
    assert ring.acquire(200, new)[::2] == (1, True)  # too small: a new segment
    for _ in range(SLOTS - 1):  # slot 0, then new segments up to SLOTS
        assert ring.acquire(10, new)[0] >= 0
    assert ring.acquire(10, new)[0] == -1  # all busy: a fresh segment outside the ring
    ring.start_pass()
    assert flags[1].eq(UNSENT).all()


def test_receiver_copies_out_and_hands_the_slot_back():
    flags = ring_flags(1)
    ring = WorkerRing(flags, 0)
    nbytes = 2 * 3 * 1 + 64 + 2 * 14 * 4
    slot, segment, send = ring.acquire(nbytes, lambda n: torch.zeros(n, dtype=torch.uint8).untyped_storage())
    images = torch.empty(0, dtype=torch.uint8).set_(segment, 0, (2, 1, 3))
    images.copy_(torch.arange(6, dtype=torch.uint8).view(2, 1, 3))
    receiver = RingReceiver(flags)
    got, labels = receiver.take(ring.ship(slot, send, images))
    assert flags[0, slot] == HELD
    images.fill_(9)  # the worker writes its next batch into the same segment
    assert torch.equal(got, torch.arange(6, dtype=torch.uint8).view(2, 1, 3)) and labels.shape == (2, 14)
    plain = (torch.ones(2, 1, 3), torch.zeros(2, 14))
    assert receiver.take(plain) is plain
