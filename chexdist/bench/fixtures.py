"""Inputs the bench suites build from real images: an NIH-format folder of them, packed on request."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from chexdist.data.nih import DATA_ENTRY_COLUMNS, IMAGE_SUFFIXES
from chexdist.errors import ChexdistError


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
        writer.writerow(DATA_ENTRY_COLUMNS)
        writer.writerows(rows)
    return paths


def pack_real(images: str | os.PathLike, count: int, root: Path, settings) -> Path:
    """`count` of the images in folder `images` (cycled) as NIH-format `root/nih`, packed into `root/shards`."""
    from chexdist.data.pack import pack_dataset

    make_nih_root(find_images(images), count, root / "nih")
    pack_dataset(root / "nih", root / "shards", settings, workers=2, progress=False)
    return root / "shards"
