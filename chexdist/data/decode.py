"""Decoding train batches on the training device: `data.decode_device` (cpu|cuda).

cpu (the default): each loader worker decodes, transforms and collates its samples.

cuda, with JPEG shards: the workers only read. Each ships its batch's encoded images as one
:class:`EncodedBatch` (the bytes back to back, where each image ends, and the batch's seed words)
with the labels; the main process (:class:`BatchDecoder`) decodes the whole batch with nvJPEG in one
call (`torchvision.io.decode_jpeg` on a list, `device="cuda"`), then runs the per-image transform
(resize, crop, flips, jitter) on the GPU, seeded from the batch's words exactly as the worker seeds
it, so the batch holds the same crops and flips as a CPU-decoded one. PNG has no GPU decoder in the
stack, so PNG shards keep CPU decode (one info line says so). Without CUDA the loader falls back to
the CPU path with one warning line, and its batches are then exactly the CPU path's.

What the workers still do on that path: read by the shard index and take labels; a sample whose
index row or json is bad is skipped and replaced in the worker as on the CPU path. An image that
nvJPEG cannot decode is decoded alone on the CPU (PIL fallback included); one that nothing decodes
is counted in the loader's skips and replaced by the nearest decodable image of its own batch (the
CPU path takes a sample from further on in the ring instead).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from chexdist.data.samples import decode_gray
from chexdist.errors import ChexdistError
from chexdist.labels import NUM_LABELS

log = logging.getLogger(__name__)

DECODE_DEVICES = ("cpu", "cuda")
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


class EncodedBatch(NamedTuple):
    """A batch of encoded images: `data` uint8 [total bytes] back to back, `ends` int64 [B] the end of each
    image in `data`, `words` int64 [4] the batch's seed words (see `chexdist.data.loader.seed_words`)."""

    data: torch.Tensor
    ends: torch.Tensor
    words: torch.Tensor

    def blobs(self) -> list[torch.Tensor]:
        """Each image's bytes, as views of `data`."""
        ends = self.ends.tolist()
        return [self.data[start:end] for start, end in zip([0] + ends[:-1], ends)]


class EncodedRows:
    """One batch collected in a worker with its images still encoded (the CPU path's batch, minus decoding)."""

    def __init__(self, size: int, words: np.ndarray):
        self.blobs: list[bytes] = [b""] * size
        self.labels = torch.zeros((size, NUM_LABELS), dtype=torch.float32)
        self.words = words

    def put(self, row: int, blob: bytes, labels: torch.Tensor | None = None) -> None:
        self.blobs[row] = blob
        if labels is not None:
            self.labels[row] = labels

    def finish(self) -> EncodedBatch:
        data = torch.frombuffer(bytearray(b"".join(self.blobs)), dtype=torch.uint8)
        ends = torch.tensor(np.cumsum([len(blob) for blob in self.blobs]), dtype=torch.int64)
        return EncodedBatch(data, ends, torch.tensor(self.words.astype(np.int64)))


def decode_jpeg_batch(blobs: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Gray uint8 [1,H,W] images of a list of JPEG byte tensors (on the CPU) in one call: nvJPEG's batched
    decode on a CUDA device, libjpeg-turbo on the CPU. Raises RuntimeError if any image fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        return decode_jpeg(blobs, mode=ImageReadMode.GRAY, device=device)


def _formats(manifest: dict) -> set[Any]:
    sources = (manifest.get("mixture") or {}).get("sources") or [manifest]
    return {(source.get("image") or {}).get("format") for source in sources}


def batch_decode_device(requested: str | torch.device, manifest: dict) -> torch.device | None:
    """The device the main process decodes train batches on, or None: the workers decode (the CPU path).

    `requested` is `data.decode_device`, or a torch.device to decode there whatever the shards (tests use
    the CPU to run this path without a GPU). cuda without CUDA, or with PNG shards, gives None with one log line.
    """
    if isinstance(requested, torch.device):
        return requested
    if requested not in DECODE_DEVICES:
        raise ChexdistError(f"config key 'data.decode_device': {requested!r} is not one of {', '.join(DECODE_DEVICES)}")
    if requested == "cpu":
        return None
    if not torch.cuda.is_available():
        log.warning("data.decode_device=cuda but CUDA is not available: the loader workers decode JPEG on the CPU")
        return None
    formats = _formats(manifest)
    if formats != {"jpg"}:
        log.info("data.decode_device=cuda: %s shards are decoded on the CPU (nvJPEG decodes JPEG only)",
                 "/".join(sorted(str(f) for f in formats)))
        return None
    return torch.device("cuda", torch.cuda.current_device())


class BatchDecoder:
    """Main process: (EncodedBatch, labels) -> (uint8 images [B,C,H,W] on `device`, labels), the per-image
    transform (and `normalize`, if the loader normalizes) applied there, seeded as the worker would."""

    def __init__(self, per_image: Callable[[torch.Tensor], torch.Tensor], normalize: torch.nn.Module | None,
                 device: torch.device, stats: Any, slot: int):
        self.per_image, self.normalize, self.device, self.stats, self.slot = per_image, normalize, device, stats, slot

    def __call__(self, batch: tuple[EncodedBatch, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from chexdist.data.loader import seeded

        encoded, labels = batch
        blobs = encoded.blobs()
        try:
            images = decode_jpeg_batch(blobs, self.device)
        except RuntimeError:
            images = self._one_by_one(blobs)
        with seeded(encoded.words.numpy().astype(np.uint32)):
            out = torch.stack([self.per_image(image) for image in images])
        return (out if self.normalize is None else self.normalize(out)), labels

    def _one_by_one(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        """A batch nvJPEG refused: each image alone on the CPU; a lost one is replaced by its nearest decodable neighbour."""
        images: list[torch.Tensor | None] = []
        for row, blob in enumerate(blobs):
            try:
                images.append(decode_gray(blob.numpy().tobytes()).to(self.device))
            except Exception as exc:
                self.stats.skip(self.slot, f"image {row} of a batch decoded on {self.device}", exc)
                images.append(None)
        kept = [i for i, image in enumerate(images) if image is not None]
        if not kept:
            raise ChexdistError(f"no image of a {len(blobs)}-image train batch could be decoded; see the warnings above")
        return [image if image is not None else images[min(kept, key=lambda k: (abs(k - row), k))]
                for row, image in enumerate(images)]
