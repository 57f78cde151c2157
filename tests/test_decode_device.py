"""data.decode_device: batches of encoded JPEGs decoded by the main process (nvJPEG on CUDA) give the
CPU path's tensors; without CUDA the loader falls back to the CPU path with one log line."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chexdist.config import Config
from chexdist.config.parse import apply_overrides
from chexdist.data.decode import BatchDecoder, EncodedBatch, EncodedRows, batch_decode_device, decode_jpeg_batch
from chexdist.data.loader import build_train_loader
from chexdist.data.reader import LoaderStats
from chexdist.data.samples import decode_gray, image_bytes
from chexdist.data.shardformat import iter_tar, shard_urls
from chexdist.data.transforms import build_transform
from chexdist.errors import ChexdistError
from tests.test_data import batches_of, same_batches

AUGMENT = build_transform("strong", image_size=24, eval_resize=28, train=True)
EVAL_U8 = build_transform("none", image_size=24, eval_resize=28, train=False)


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """Real chexdist JPEG shards (pack: indexed, q95), 60 synthetic X-rays at 32 px in shards of 8."""
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("jpeg")
    make_synthetic_nih(root / "nih", images=60, size=40, seed=3)
    settings = PackSettings(split="random", fractions=(0.9, 0.05, 0.05), size=32, format="jpg", shard_size=8)
    pack_dataset(root / "nih", root / "shards", settings, workers=1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def tar_only(jpeg_shards, tmp_path_factory) -> Path:
    """The same shards without their index: read through the tar reader and each sample's json."""
    import shutil

    root = tmp_path_factory.mktemp("jpeg-tar")
    for path in jpeg_shards.iterdir():
        if path.is_file() and not path.name.endswith(".idx"):
            shutil.copy2(path, root / path.name)
    return root


def jpeg_blobs(root: Path) -> list[bytes]:
    return [image_bytes(sample) for url in shard_urls(root, "train") for sample in iter_tar(url)]


def epoch(root: Path, workers: int, transform=AUGMENT, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader, _ = build_train_loader(root, 5, transform, workers, 1, 0, seed=7, epoch=2, shuffle_buffer=6, **kw)
    return batches_of(loader)


def test_batched_decode_equals_single_decodes():
    """One decode_jpeg call on a list (device=cpu) = torchvision's single decode = PIL's, pixel for pixel."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in ((17, 23), (32, 32), (9, 40))]
    blobs = []
    for image in pixels:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    batch = decode_jpeg_batch([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], "cpu")
    assert len(batch) == 3
    for got, blob in zip(batch, blobs):
        assert got.dtype == torch.uint8 and got.shape[0] == 1 and got.device.type == "cpu"
        assert torch.equal(got, decode_gray(blob))
        assert torch.equal(got[0], torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("L"))))


def test_encoded_rows_round_trip(jpeg_shards):
    blobs = jpeg_blobs(jpeg_shards)[:4]
    rows = EncodedRows(4, np.array([1, 2, 3, 4], dtype=np.uint32))
    for row in (2, 0, 3, 1):
        rows.put(row, blobs[row], torch.full((14,), float(row)))
    batch = rows.finish()
    assert [bytes(b.numpy()) for b in batch.blobs()] == blobs
    assert batch.words.tolist() == [1, 2, 3, 4] and rows.labels[:, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_in_the_main_process_equals_the_workers(jpeg_shards, workers):
    """The device path itself, run on the CPU: workers ship bytes, the main process decodes the batch in
    one call and augments it (strong preset: crops, flips, jitter, affine) from the batch's seed: the
    same tensors as workers that decode, also from a mid-epoch start."""
    cpu = epoch(jpeg_shards, workers)
    assert len(cpu) == 11
    here = epoch(jpeg_shards, workers, decode_device=torch.device("cpu"))
    assert same_batches(here, cpu)
    assert same_batches(epoch(jpeg_shards, workers, normalize_in_loader=False, decode_device=torch.device("cpu")),
                        epoch(jpeg_shards, workers, normalize_in_loader=False))
    assert same_batches(epoch(jpeg_shards, workers, decode_device=torch.device("cpu"), start_batch=6), cpu[6:])
    loader, _ = build_train_loader(jpeg_shards, 5, AUGMENT, workers, 1, 0, seed=7, epoch=2, decode_device=torch.device("cpu"))
    shipped, _ = next(iter(loader.loader))
    assert isinstance(shipped, EncodedBatch) and shipped.data.dtype == torch.uint8 and len(shipped.ends) == 5


def test_tar_reader_ships_the_same_bytes(jpeg_shards, tar_only):
    cpu = epoch(jpeg_shards, 0)
    assert same_batches(epoch(tar_only, 1, decode_device=torch.device("cpu")), epoch(tar_only, 1))
    assert same_batches(epoch(tar_only, 0, decode_device=torch.device("cpu")), cpu)


def test_worker_batches_are_one_shared_segment(jpeg_shards):
    """Images and labels of a worker's batch are views of one shared-memory buffer: one file descriptor
    (one round trip to the worker's resource sharer) per batch."""
    loader, _ = build_train_loader(jpeg_shards, 5, AUGMENT, 1, 1, 0, seed=7, epoch=2, shuffle_buffer=6, normalize_in_loader=False)
    images, labels = next(iter(loader.loader))
    assert images.dtype == torch.uint8 and images.untyped_storage().data_ptr() == labels.untyped_storage().data_ptr()
    assert images.is_shared() and labels.storage_offset() * 4 >= images.numel()


def test_cuda_without_cuda_falls_back_with_one_line(jpeg_shards, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = epoch(jpeg_shards, 2)
    with caplog.at_level(logging.INFO, logger="chexdist"):
        fallback = epoch(jpeg_shards, 2, decode_device="cuda")
    lines = [r for r in caplog.records if r.name == "chexdist.data.decode"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "CUDA is not available" in lines[0].getMessage()
    assert same_batches(fallback, cpu)


def test_png_shards_keep_cpu_decode(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with caplog.at_level(logging.INFO, logger="chexdist"):
        assert batch_decode_device("cuda", {"image": {"format": "png"}}) is None
    assert [r.getMessage() for r in caplog.records] == ["data.decode_device=cuda: png shards are decoded on the CPU (nvJPEG decodes JPEG only)"]
    assert batch_decode_device("cuda", {"image": {"format": "jpg"}}) == torch.device("cuda", 0)
    assert batch_decode_device("cpu", {"image": {"format": "jpg"}}) is None


def test_undecodable_image_is_counted_and_replaced_by_a_neighbour(jpeg_shards):
    blobs = jpeg_blobs(jpeg_shards)[:3]
    rows = EncodedRows(3, np.array([5, 6, 7, 8], dtype=np.uint32))
    for row, blob in enumerate([blobs[0], b"not a jpeg", blobs[2]]):
        rows.put(row, blob)
    stats = LoaderStats(1)
    per_image = build_transform("none", image_size=24, eval_resize=28, train=False).transforms[:-1]
    images, _ = BatchDecoder(torch.nn.Sequential(*per_image), None, torch.device("cpu"), stats, 0)((rows.finish(), rows.labels))
    assert stats.skipped == 1
    first = torch.nn.Sequential(*per_image)(decode_gray(blobs[0]))
    assert torch.equal(images[1], first) and torch.equal(images[0], first)
    assert torch.equal(images[2], torch.nn.Sequential(*per_image)(decode_gray(blobs[2])))


def test_config_key():
    assert Config().data.decode_device == "cpu"
    assert apply_overrides(Config(), ["data.decode_device=cuda"]).data.decode_device == "cuda"
    with pytest.raises(ChexdistError) as caught:
        apply_overrides(Config(), ["data.decode_device=gpu"])
    message = str(caught.value)
    assert "\n" not in message and "data.decode_device" in message and "cpu, cuda" in message
