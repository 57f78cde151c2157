"""A synthetic dataset in the exact NIH ChestX-ray14 file format, with learnable findings.

It exists so the whole path (nih -> pack -> train -> evaluate -> cam) runs on a laptop in minutes and
in tests without the 45 GB download. The files follow the real release's formats exactly:
``Data_Entry_2017.csv`` (2017 revision, trailing empty column), ``BBox_List_2017.csv`` (1024-px box
coordinates, ``Infiltrate`` spelling), ``train_val_list.txt`` / ``test_list.txt`` (patient-disjoint)
and 8-bit grayscale PNGs under ``images_0NN/images/`` (Kaggle layout).

Each image is a chest-like background (body, two dark lungs, bright mediastinum, noise) plus one
motif per positive finding. Every finding has its own motif (disk, ring, stripes, checker, cross ...)
whose identity survives a horizontal flip, a random resized crop and a resize to 64 px, so a small
CNN learns all 14 classes in a few epochs. Motifs sit in distinct cells of a 3x3 grid and never overlap.

Everything is derived from `seed`: the plan (patients, labels, placements) in one pass, and each
image's pixels from ``(seed, image index)``, so output is identical for any number of workers.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_text
from chexdist.data.images import encode
from chexdist.labels import LABELS, NO_FINDING, NUM_LABELS
from chexdist.data.nih import BBOX_FINDINGS, DATA_ENTRY_COLUMNS, TEST_LIST, TRAIN_VAL_LIST

DATA_ENTRY = "Data_Entry_2017.csv"
BBOX_LIST = "BBox_List_2017.csv"
DATA_ENTRY_HEADER = ",".join(DATA_ENTRY_COLUMNS) + ","  # the 2017 file's trailing empty column
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
ORIGINAL_SIZE = 1024
# The real BBox_List spells Infiltration "Infiltrate".
BBOX_SPELLING = {"Infiltration": "Infiltrate"}
BBOX_IMAGE_FRACTION = 0.3

# Marginal prevalence per finding (canonical order): 8-25%, Hernia rarer, like NIH's ranking.
PREVALENCE = (0.18, 0.10, 0.20, 0.25, 0.12, 0.12, 0.08, 0.10, 0.10, 0.08, 0.08, 0.08, 0.09, 0.05)
NORMAL_FRACTION = 0.3  # images drawn as No Finding outright (NIH has ~54%)
TEST_PATIENT_FRACTION = 0.2
IMAGES_PER_PATIENT_WEIGHTS = (0.30, 0.20, 0.15, 0.13, 0.12, 0.10)  # 1..6 follow-ups
MAX_FOLDERS = 12  # images_001 .. images_012 as in the Kaggle release
MIN_PER_FOLDER = 100
PIXEL_SPACINGS = (0.143, 0.168, 0.139, 0.171)

GRID = 3
MARGIN = 0.06  # fraction of the side kept free of motifs at each border
MOTIF_FILL = (0.80, 0.95)  # motif side as a fraction of a grid cell
AMPLITUDE = (60.0, 90.0)  # motif contrast in gray levels, never clipped (see _halo)
NOISE_SIGMA = 6.0
N_BACKGROUNDS = 8
SUPERSAMPLE = 4
MIN_SIZE = 32

_SYNTH_DIR = re.compile(r"images_\d{3}")


def _disk(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.hypot(u, v) < 0.85).astype(np.float32)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    return ((r > 0.55) & (r < 0.9)).astype(np.float32)


def _bullseye(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    return (r < 0.45).astype(np.float32) - ((r > 0.65) & (r < 0.9)).astype(np.float32)


def _bands(t: np.ndarray, other: np.ndarray) -> np.ndarray:
    inside = (np.abs(t) < 0.9) & (np.abs(other) < 0.9)
    sign = np.where(np.abs(t) < 0.3, -1.0, 1.0)
    return (inside * sign).astype(np.float32)


def _hstripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _bands(v, u)


def _vstripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _bands(u, v)


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = (np.abs(u) < 0.9) & (np.abs(v) < 0.9)
    cu = np.floor((u + 0.9) / 0.6)
    cv = np.floor((v + 0.9) / 0.6)
    return (inside * np.where((cu + cv) % 2 == 0, 1.0, -1.0)).astype(np.float32)


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.hypot(np.abs(u) - 0.45, np.abs(v) - 0.45) < 0.33).astype(np.float32)


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bar = lambda a, b: (np.abs(a) < 0.25) & (np.abs(b) < 0.9)  # noqa: E731
    return (bar(u, v) | bar(v, u)).astype(np.float32)


def _x(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
    return (inside & ((np.abs(u - v) < 0.35) | (np.abs(u + v) < 0.35))).astype(np.float32)


def _dipole(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
    return (inside * np.where(v < 0, 1.0, -1.0)).astype(np.float32)


def _negate(f: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda u, v: -f(u, v)


# One motif per finding, canonical order. All are symmetric under a horizontal flip, and no motif
# becomes another one under a flip, a mild aspect change or blur to ~15 px.
MOTIFS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Atelectasis": _hstripes,
    "Cardiomegaly": _disk,
    "Effusion": _negate(_disk),
    "Infiltration": _checker,
    "Mass": _bullseye,
    "Nodule": _dots,
    "Pneumonia": _ring,
    "Pneumothorax": _negate(_ring),
    "Consolidation": _plus,
    "Edema": _vstripes,
    "Emphysema": _negate(_plus),
    "Fibrosis": _x,
    "Pleural_Thickening": _dipole,
    "Hernia": _negate(_x),
}
MOTIF_NAMES = {
    "Atelectasis": "horizontal stripes",
    "Cardiomegaly": "bright disk",
    "Effusion": "dark disk",
    "Infiltration": "checkerboard",
    "Mass": "bullseye",
    "Nodule": "2x2 dots",
    "Pneumonia": "bright ring",
    "Pneumothorax": "dark ring",
    "Consolidation": "bright plus",
    "Edema": "vertical stripes",
    "Emphysema": "dark plus",
    "Fibrosis": "bright X",
    "Pleural_Thickening": "bright-over-dark halves",
    "Hernia": "dark X",
}


@functools.lru_cache(maxsize=512)
def motif_stamp(label: int, side: int) -> np.ndarray:
    """The anti-aliased motif of finding `label` as a side x side float32 array in [-1, 1]."""
    n = side * SUPERSAMPLE
    t = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    u, v = np.meshgrid(t, t)
    hi = MOTIFS[LABELS[label]](u, v)
    return hi.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _halo(side: int) -> np.ndarray:
    """Weight that fades to 0 at the stamp's border: shifts the local background under a motif
    (e.g. away from black air for a dark motif) so its contrast never clips away, without a hard edge."""
    t = np.abs((np.arange(side, dtype=np.float32) + 0.5) / side * 2.0 - 1.0)
    edge = np.clip((1.0 - t) / 0.12, 0.0, 1.0)
    return np.minimum(edge[:, None], edge[None, :]).astype(np.float32)


def _smooth_step(d: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -30, 30)))


def _chest(rng: np.random.Generator, size: int) -> np.ndarray:
    """One chest-like background in gray levels: air, body, two dark lungs, mediastinum, diaphragm."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    u, v = np.meshgrid(t, t)
    body = _smooth_step(np.hypot(u / rng.uniform(0.82, 0.95), (v - 0.05) / 1.05) - 1.0, 0.04)
    img = 25.0 + 120.0 * body
    lung_w, lung_h = rng.uniform(0.24, 0.32), rng.uniform(0.48, 0.6)
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(0.33, 0.42)
        cy = rng.uniform(-0.12, 0.0)
        lung = _smooth_step(np.hypot((u - cx) / lung_w, (v - cy) / lung_h) - 1.0, 0.08)
        ribs = 0.5 + 0.5 * np.cos((v - 0.3 * u * u) * rng.uniform(14, 18))
        img -= lung * (rng.uniform(55, 75) - 10.0 * ribs)
    img += 45.0 * _smooth_step(np.abs(u) - rng.uniform(0.08, 0.13), 0.03) * body
    img += 30.0 * _smooth_step(np.hypot((u + 0.1) / 0.25, (v - 0.25) / 0.3) - 1.0, 0.1)
    img += 35.0 * _smooth_step(0.62 - v + 0.15 * u * u, 0.05) * body
    return img.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _backgrounds(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Chest templates and a 2x-size noise field (fine grain + low-frequency mottle) for (seed, size)."""
    rng = np.random.default_rng([seed, size, 0xC4E57])
    chests = np.stack([_chest(rng, size) for _ in range(N_BACKGROUNDS)])
    fine = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    coarse_n = max(4, size // 16)
    coarse = Image.fromarray(rng.standard_normal((coarse_n, coarse_n), dtype=np.float32))
    mottle = np.asarray(coarse.resize((2 * size, 2 * size), Image.Resampling.BILINEAR), dtype=np.float32)
    return chests, (fine * NOISE_SIGMA + mottle * (NOISE_SIGMA * 1.5)).astype(np.float32)


@dataclass(frozen=True)
class Placement:
    label: int
    x: int
    y: int
    side: int


@dataclass(frozen=True)
class _Row:
    index: int
    name: str
    folder: str
    patient: int
    follow_up: int
    age: int
    sex: str
    view: str
    spacing: float
    labels: tuple[int, ...]
    placements: tuple[Placement, ...]


def render_image(seed: int, index: int, size: int, placements: tuple[Placement, ...]) -> np.ndarray:
    """Pixels of image `index`: depends only on (seed, index, size, placements)."""
    chests, noise = _backgrounds(seed, size)
    rng = np.random.default_rng([seed, index, 0x1A6E])
    which = int(rng.integers(N_BACKGROUNDS))
    oy, ox = (int(o) for o in rng.integers(0, size, 2))
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    img = chests[which] * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(-15, 15))
    img += noise[oy : oy + size, ox : ox + size]
    img += ramp[:, None] * np.float32(rng.uniform(-12, 12)) + ramp[None, :] * np.float32(rng.uniform(-12, 12))
    for p in placements:
        amplitude = float(rng.uniform(*AMPLITUDE))
        stamp = motif_stamp(p.label, p.side)
        patch = img[p.y : p.y + p.side, p.x : p.x + p.side]
        mean = float(patch.mean())
        lo, hi = 5.0 - amplitude * float(stamp.min()), 250.0 - amplitude * float(stamp.max())
        shift = min(max(mean, lo), hi) - mean
        patch += np.float32(shift) * _halo(p.side) + np.float32(amplitude) * stamp
    np.clip(img, 0.0, 255.0, out=img)
    return (img + 0.5).astype(np.uint8)


def _render_batch(out: str, seed: int, size: int, rows: list[_Row]) -> int:
    for row in rows:
        png = encode(render_image(seed, row.index, size, row.placements), "png")
        with open(os.path.join(out, row.folder, "images", row.name), "wb") as f:
            f.write(png)
    return len(rows)


def _patient_sizes(rng: np.random.Generator, images: int, patients: int | None) -> list[int]:
    if patients is None:
        weights = np.asarray(IMAGES_PER_PATIENT_WEIGHTS) / sum(IMAGES_PER_PATIENT_WEIGHTS)
        draws = rng.choice(len(weights), size=images, p=weights) + 1
        total = np.cumsum(draws)
        n = int(np.searchsorted(total, images)) + 1
        sizes = [int(d) for d in draws[:n]]
        sizes[-1] -= int(total[n - 1]) - images
        return sizes if len(sizes) >= 2 else [images - 1, 1]
    extra = rng.multinomial(images - patients, np.full(patients, 1.0 / patients))
    return [1 + int(e) for e in extra]


_ABNORMAL_PREVALENCE = np.minimum(np.asarray(PREVALENCE) / (1.0 - NORMAL_FRACTION), 0.95)


def _draw_labels(rng: np.random.Generator, cells: int) -> tuple[int, ...]:
    if rng.random() < NORMAL_FRACTION:
        return (0,) * NUM_LABELS
    while True:
        draw = rng.random(NUM_LABELS) < _ABNORMAL_PREVALENCE
        if 0 < draw.sum() <= cells:
            return tuple(int(b) for b in draw)


def _place(rng: np.random.Generator, labels: tuple[int, ...], size: int) -> tuple[Placement, ...]:
    positives = [i for i, b in enumerate(labels) if b]
    cell = (1.0 - 2 * MARGIN) * size / GRID
    cells = rng.permutation(GRID * GRID)[: len(positives)]
    placed = []
    for label, c in zip(positives, cells):
        side = int(round(cell * rng.uniform(*MOTIF_FILL)))
        x0 = MARGIN * size + (c % GRID) * cell
        y0 = MARGIN * size + (c // GRID) * cell
        x = int(x0 + rng.uniform(0, cell - side))
        y = int(y0 + rng.uniform(0, cell - side))
        placed.append(Placement(label, x, y, side))
    return tuple(placed)


def _plan(images: int, size: int, seed: int, patients: int | None) -> tuple[list[_Row], set[int]]:
    rng = np.random.default_rng([seed, 0x5EED])
    sizes = _patient_sizes(rng, images, patients)
    per_folder = max(MIN_PER_FOLDER, math.ceil(images / MAX_FOLDERS))
    rows: list[_Row] = []
    for pid0, count in enumerate(sizes):
        pid = pid0 + 1
        sex = "M" if rng.random() < 0.56 else "F"
        age = int(np.clip(rng.normal(47, 17), 1, 94))
        for follow_up in range(count):
            index = len(rows)
            labels = _draw_labels(rng, GRID * GRID)
            rows.append(
                _Row(
                    index=index,
                    name=f"{pid:08d}_{follow_up:03d}.png",
                    folder=f"images_{index // per_folder + 1:03d}",
                    patient=pid,
                    follow_up=follow_up,
                    age=age + follow_up // 2,
                    sex=sex,
                    view="PA" if rng.random() < 0.6 else "AP",
                    spacing=float(rng.choice(PIXEL_SPACINGS)),
                    labels=labels,
                    placements=_place(rng, labels, size),
                )
            )
    n_patients = len(sizes)
    n_test = min(n_patients - 1, max(1, round(TEST_PATIENT_FRACTION * n_patients)))
    test_patients = {int(p) + 1 for p in rng.permutation(n_patients)[:n_test]}
    return rows, test_patients


def plan(images: int, size: int, seed: int, patients: int | None = None) -> tuple[list[_Row], set[int]]:
    """The synthetic rows (patient, follow-up, labels, motif placements ...) and the test patients;
    the other layouts (`chexdist.data.synthlayouts`) write the same plan in their release's files."""
    return _plan(images, size, seed, patients)


def _finding_text(labels: tuple[int, ...]) -> str:
    names = sorted(LABELS[i] for i, b in enumerate(labels) if b)
    return "|".join(names) if names else NO_FINDING


def _data_entry_csv(rows: list[_Row]) -> str:
    lines = [DATA_ENTRY_HEADER]
    for r in rows:
        lines.append(
            f"{r.name},{_finding_text(r.labels)},{r.follow_up},{r.patient},{r.age},{r.sex},{r.view},"
            f"{ORIGINAL_SIZE},{ORIGINAL_SIZE},{r.spacing},{r.spacing},"
        )
    return "\n".join(lines) + "\n"


def _bbox_csv(rows: list[_Row], size: int, seed: int) -> tuple[str, int]:
    rng = np.random.default_rng([seed, 0xB0B])
    boxed = {LABELS.index(name) for name in BBOX_FINDINGS}
    scale = ORIGINAL_SIZE / size
    lines = [BBOX_HEADER]
    for r in rows:
        candidates = [p for p in r.placements if p.label in boxed]
        if not candidates or rng.random() >= BBOX_IMAGE_FRACTION:
            continue
        for p in candidates:
            name = LABELS[p.label]
            lines.append(
                f"{r.name},{BBOX_SPELLING.get(name, name)},{p.x * scale!r},{p.y * scale!r},"
                f"{p.side * scale!r},{p.side * scale!r}"
            )
    return "\n".join(lines) + "\n", len(lines) - 1


def _prepare_out(out: Path, overwrite: bool) -> None:
    ours = [out / n for n in (DATA_ENTRY, BBOX_LIST, TRAIN_VAL_LIST, TEST_LIST)]
    if out.exists():
        if not out.is_dir():
            raise ChexdistError(f"{out}: exists and is not a directory")
        ours += [p for p in out.iterdir() if p.is_dir() and _SYNTH_DIR.fullmatch(p.name)]
        present = [p for p in ours if p.exists()]
        if present and not overwrite:
            raise ChexdistError(
                f"{out}: already holds a dataset ({present[0].name}); choose an empty folder or overwrite"
            )
        for p in present:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_synthetic_nih(
    out: str | os.PathLike,
    images: int = 300,
    size: int = 256,
    seed: int = 0,
    patients: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic NIH-format dataset to `out` and return a summary.

    `patients` None draws 1-6 images per patient; `workers` > 1 renders in a process pool with
    identical output. The CSV, box list and split lists are written (atomically) after all images,
    so a folder without ``Data_Entry_2017.csv`` is an interrupted run. With `overwrite`, only the
    files and ``images_NNN`` folders this function writes are removed first.
    """
    if images < 2:
        raise ChexdistError(f"synthetic dataset needs at least 2 images (2 patients), got {images}")
    if size < MIN_SIZE:
        raise ChexdistError(f"synthetic image size must be >= {MIN_SIZE}, got {size}")
    if patients is not None and not 2 <= patients <= images:
        raise ChexdistError(f"patients must be between 2 and images ({images}), got {patients}")
    if workers < 1:
        raise ChexdistError(f"workers must be >= 1, got {workers}")
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    rows, test_patients = _plan(images, size, seed, patients)
    folders = sorted({r.folder for r in rows})
    for folder in folders:
        (out / folder / "images").mkdir(parents=True, exist_ok=True)

    if workers == 1:
        _render_batch(str(out), seed, size, rows)
    else:
        chunk = max(1, min(256, math.ceil(len(rows) / (workers * 4))))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            batches = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
            futures = [pool.submit(_render_batch, str(out), seed, size, batch) for batch in batches]
            for f in futures:
                f.result()
    render_seconds = time.perf_counter() - start

    bbox_text, n_boxes = _bbox_csv(rows, size, seed)
    atomic_write_text(out / BBOX_LIST, bbox_text)
    train_val = [r.name for r in rows if r.patient not in test_patients]
    test = [r.name for r in rows if r.patient in test_patients]
    atomic_write_text(out / TRAIN_VAL_LIST, "".join(n + "\n" for n in sorted(train_val)))
    atomic_write_text(out / TEST_LIST, "".join(n + "\n" for n in sorted(test)))
    atomic_write_text(out / DATA_ENTRY, _data_entry_csv(rows))

    positives = np.asarray([r.labels for r in rows]).sum(axis=0)
    n_patients = len({r.patient for r in rows})
    return {
        "out": str(out),
        "images": len(rows),
        "patients": n_patients,
        "size": size,
        "seed": seed,
        "positives": {name: int(c) for name, c in zip(LABELS, positives)},
        "no_finding": sum(1 for r in rows if not any(r.labels)),
        "boxes": n_boxes,
        "motifs": dict(MOTIF_NAMES),
        "train_val_images": len(train_val),
        "test_images": len(test),
        "train_val_patients": n_patients - len(test_patients),
        "test_patients": len(test_patients),
        "data_entry": str(out / DATA_ENTRY),
        "bbox_list": str(out / BBOX_LIST),
        "train_val_list": str(out / TRAIN_VAL_LIST),
        "test_list": str(out / TEST_LIST),
        "image_dirs": [str(out / f / "images") for f in folders],
        "seconds": round(time.perf_counter() - start, 3),
        "images_per_s": round(len(rows) / render_seconds, 1) if render_seconds > 0 else None,
    }
