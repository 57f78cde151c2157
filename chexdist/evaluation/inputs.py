"""Image files as an exported run's model input, exactly as its training data was prepared.

A file (PNG, JPEG, or DICOM recognised by content) goes through packing's decoding and resize (`chexdist.data.images.load_gray8` +
`resize_shorter` to the run's packed size, and a JPEG round trip when the shards were JPEG), then
the run's eval transform (Resize + CenterCrop + normalization). `Geometry` maps original-pixel coordinates (radiologist
boxes) into the model's input crop. `unlike_training` compares a file with the statistics packing
recorded for the training split, so `chexdist predict` can warn about inputs the model never saw.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from chexdist.errors import ChexdistError
from chexdist.data.dicom import is_dicom
from chexdist.data.images import encode, image_statistics, load_gray8, resize_shorter
from chexdist.data.nih import IMAGE_SUFFIXES
from chexdist.data.transforms import split_normalization

# A colour file whose channels differ by more than this (mean absolute gray levels) holds real colour.
COLOUR_TOLERANCE = 2.0
STAT_NAMES = {"short_side": "shorter side (px)", "aspect": "aspect ratio (w/h)", "mean": "mean intensity", "std": "contrast (std)"}
STAT_BAND = ("p0.1", "p99.9")


def _is_input(path: Path) -> bool:
    """A PNG/JPEG by its name, or a DICOM by its content (PACS exports often have no extension)."""
    return path.is_file() and (path.name.lower().endswith(IMAGE_SUFFIXES) or is_dicom(path))


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], bool]:
    """Files named directly (any suffix: a non-image fails later, listed) and the PNG/JPEG/DICOM files
    under named folders, sorted; the flag says whether a folder was given (progress bars are for folders)."""
    files: list[Path] = []
    folder = False
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folder = True
            files += sorted(p for p in path.rglob("*") if _is_input(p))
        else:
            files.append(path)
    if not files:
        raise ChexdistError(f"no images among {', '.join(map(str, inputs)) or 'the inputs'}; pass PNG/JPEG/DICOM files or folders of them")
    return files, folder


def packing(info: dict[str, Any]) -> tuple[int, str, int]:
    """(shorter side, format, JPEG quality) the run's shards were packed with; (0, "png", 0), i.e. no
    pack resize, for an imported checkpoint that was never trained on chexdist shards."""
    image = (info.get("shards") or {}).get("image") or {}
    return int(image.get("size") or 0), str(image.get("format") or "png"), int(image.get("quality") or 0)


def dicom_window(info: dict[str, Any]) -> str:
    """The DICOM window the run's shards were rendered with (`image.dicom_window`, default "auto")."""
    return str(((info.get("shards") or {}).get("image") or {}).get("dicom_window") or "auto")


def training_statistics(info: dict[str, Any]) -> dict[str, Any] | None:
    """The statistics packing recorded for the training split (else any split), or None."""
    stats = ((info.get("shards") or {}).get("image") or {}).get("stats") or {}
    return stats.get("train") or next((s for s in stats.values() if s), None)


@dataclass(frozen=True)
class Geometry:
    """Where original pixels land in the model input: scale to the resized image, then the crop."""

    original: tuple[int, int]  # (height, width) of the decoded file
    resized: tuple[int, int]  # after the pack resize and the eval Resize
    crop: tuple[int, int]
    top: int
    left: int

    def to_input(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """A box (x, y, w, h) in original pixels as (x0, y0, x1, y1) in input pixels, not clipped."""
        sy, sx = self.resized[0] / self.original[0], self.resized[1] / self.original[1]
        return x * sx - self.left, y * sy - self.top, (x + w) * sx - self.left, (y + h) * sy - self.top


@dataclass
class Prepared:
    """One file ready for the model: `input` [3,h,w] normalized, `crop` the same pixels as uint8."""

    path: Path
    input: torch.Tensor
    crop: np.ndarray
    geometry: Geometry
    stats: dict[str, float]
    colour: bool
    warnings: list[str] = field(default_factory=list)


def _has_colour(path: Path) -> bool:
    """True when the file stores colour whose channels differ (X-rays are gray; RGBA copies of gray are not;
    a DICOM that rendered is MONOCHROME1/2)."""
    if is_dicom(path):
        return False
    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
            return False
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    return float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()) > COLOUR_TOLERANCE


class InputPipeline:
    """The run's preparation of one file; thread-safe (no state changes after construction)."""

    def __init__(self, info: dict[str, Any], transform: v2.Compose):
        self.size, self.format, self.quality = packing(info)
        self.window = dicom_window(info)
        per_image, self.normalize = split_normalization(transform)
        self.steps = list(per_image.transforms)
        self.resize = next((t for t in self.steps if isinstance(t, v2.Resize)), None)
        self.center = next((t for t in self.steps if isinstance(t, v2.CenterCrop)), None)
        if self.resize is None or self.center is None:
            raise ChexdistError("the run's eval transform has no Resize + CenterCrop; box geometry needs chexdist's eval transform")
        self.reference = training_statistics(info)

    def packed(self, path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
        """The 8-bit image exactly as a shard of this run would hold it, and the file's (h, w)."""
        original = load_gray8(path, dicom_window=self.window)
        image = resize_shorter(original, self.size) if self.size else original
        if self.format == "jpg":
            from chexdist.data.samples import decode_gray

            image = decode_gray(encode(image, "jpg", self.quality)).numpy()[0]
        return image, original.shape

    def __call__(self, path: str | os.PathLike) -> Prepared:
        path = Path(path)
        image, original = self.packed(path)
        x = torch.from_numpy(image).unsqueeze(0)
        resized = None
        for step in self.steps:
            x = step(x)
            if step is self.resize:
                resized = tuple(x.shape[-2:])
        crop = tuple(x.shape[-2:])
        geometry = Geometry(original, resized, crop, int(round((resized[0] - crop[0]) / 2.0)), int(round((resized[1] - crop[1]) / 2.0)))
        short, aspect, mean, std = image_statistics(original, image)
        stats = {"short_side": short, "aspect": aspect, "mean": mean, "std": std}
        colour = _has_colour(path)
        prepared = Prepared(path, self.normalize(x), x[0].numpy(), geometry, stats, colour)
        prepared.warnings = unlike_training(stats, colour, self.reference)
        return prepared


def unlike_training(stats: dict[str, float], colour: bool, reference: dict[str, Any] | None) -> list[str]:
    """One message per statistic outside the training split's central 99.8% (p0.1..p99.9) band."""
    out = ["colour image: the training images were grayscale (it is converted to luminance)"] if colour else []
    if not reference:
        return out
    lo_q, hi_q = STAT_BAND
    for key, what in STAT_NAMES.items():
        band = reference.get(key)
        if not band:
            continue
        lo, hi = band[lo_q], band[hi_q]
        if not lo <= stats[key] <= hi:
            out.append(f"{what} {stats[key]:g} outside the training images' {lo:g}..{hi:g} ({lo_q}..{hi_q})")
    return out


@dataclass
class Failure:
    """An input that could not be prepared; listed at the end, never dropped silently."""

    path: Path
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"image": str(self.path), "error": self.error}


def _prepare_or_fail(pipeline: InputPipeline, path: Path) -> Prepared | Failure:
    try:
        return pipeline(path)
    except ChexdistError as exc:
        return Failure(path, str(exc))
    except OSError as exc:
        return Failure(path, f"{path}: unreadable ({exc.strerror or exc})")


def iter_prepared(pipeline: InputPipeline, files: list[Path], batch_size: int, workers: int | None = None):
    """Batches of `files` as Prepared or Failure, in order; files are decoded by a thread pool (PIL and
    the resize release the GIL), one batch at a time so memory stays bounded for any folder size."""
    from concurrent.futures import ThreadPoolExecutor

    if batch_size < 1:
        raise ChexdistError(f"--batch-size {batch_size} must be >= 1")
    workers = workers or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(files), batch_size):
            yield list(pool.map(lambda p: _prepare_or_fail(pipeline, p), files[start : start + batch_size]))
