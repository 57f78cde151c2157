"""Read an NIH ChestX-ray14 download: Data_Entry (2017 and v2020), BBox_List, official lists, images.

Everything returns plain pandas/paths; column names are normalized so the rest of chexdist never sees
the CSV's spelling (`OriginalImage[Width` ...) or the 2017 file's empty trailing column.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import find_file
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, canonical_name, parse_findings

DATA_ENTRY_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017.csv",
)
BBOX_NAMES = ("BBox_List_2017.csv",)
# The findings BBox_List_2017 has radiologist boxes for (8 of the 14), in chexdist's spelling.
BBOX_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
)  # fmt: skip
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Data_Entry's header as a CSV reader splits it (the bracketed names contain commas).
DATA_ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
_ENTRY_COLUMNS = DATA_ENTRY_COLUMNS[:7]
# The four numeric columns after those seven, whatever the header calls them.
_ENTRY_TAIL = ("orig_width", "orig_height", "spacing_x", "spacing_y")
_ENTRY_RENAME = dict(
    zip(_ENTRY_COLUMNS, ("image", "findings", "follow_up", "patient_id", "age", "sex", "view"))
)


def find_data_entry(root: str | os.PathLike) -> Path:
    root = Path(root)
    found = find_file(root, DATA_ENTRY_NAMES)
    if found is None:
        raise ChexdistError(
            f"{root}: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv (.csv or .csv.gz) found; "
            "point --nih-root at the folder of the NIH download that holds it"
        )
    return found


def _parse_age(values: pd.Series) -> pd.Series:
    """Ages are integers in most releases and strings like '058Y' in some redistributions."""
    cleaned = values.astype(str).str.strip().str.rstrip("YyMmDd")
    return pd.to_numeric(cleaned, errors="coerce").fillna(-1).astype(int)


def read_data_entry(path: str | os.PathLike) -> pd.DataFrame:
    """One row per image with columns image, patient_id, follow_up, age, sex, view, orig_width,
    orig_height, spacing_x, spacing_y, findings, and one 0/1 uint8 column per label (LABELS order)."""
    path = Path(path)
    if not path.is_file():
        raise ChexdistError(f"{path}: metadata CSV not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise ChexdistError(f"{path}: cannot parse as CSV ({exc})") from exc
    missing = [c for c in _ENTRY_COLUMNS if c not in raw.columns]
    if missing:
        raise ChexdistError(f"{path}: missing column(s) {missing}; is this an NIH Data_Entry CSV?")
    # The 2017 file ends every line with a comma: drop such unnamed, empty trailing columns.
    empty_tail = [c for c in raw.columns if c.startswith("Unnamed:") and (raw[c] == "").all()]
    raw = raw.drop(columns=empty_tail)
    tail_start = raw.columns.get_loc(_ENTRY_COLUMNS[-1]) + 1
    tail = list(raw.columns[tail_start : tail_start + len(_ENTRY_TAIL)])
    if len(tail) < len(_ENTRY_TAIL):
        raise ChexdistError(
            f"{path}: expected OriginalImage[Width,Height] and OriginalImagePixelSpacing[x,y] columns "
            f"after 'View Position'"
        )
    table = raw[list(_ENTRY_COLUMNS) + tail].rename(columns=_ENTRY_RENAME)
    table.columns = list(_ENTRY_RENAME.values()) + list(_ENTRY_TAIL)

    table["image"] = table["image"].str.strip()
    dup = table["image"][table["image"].duplicated()]
    if len(dup):
        row = int(dup.index[0]) + 2
        raise ChexdistError(f"{path} row {row}: image {dup.iloc[0]!r} is listed twice")
    for column in ("patient_id", "follow_up"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna()
        if bad.any():
            row = int(bad.idxmax()) + 2
            raise ChexdistError(
                f"{path} row {row}: {column} {table[column][bad].iloc[0]!r} is not an integer"
            )
        table[column] = numbers.astype(np.int64)
    table["age"] = _parse_age(table["age"])
    for column in _ENTRY_TAIL:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table["findings"] = table["findings"].str.strip()

    vectors = {}
    for text, first_index in table.groupby("findings", sort=False).groups.items():
        vectors[text] = parse_findings(text, where=f"{path} row {int(first_index[0]) + 2}")
    matrix = np.asarray([vectors[t] for t in table["findings"]], dtype=np.uint8).reshape(-1, len(LABELS))
    labels = pd.DataFrame(matrix, columns=list(LABELS), index=table.index)
    return pd.concat([table, labels], axis=1)


def read_bbox_list(path: str | os.PathLike) -> pd.DataFrame:
    """Radiologist boxes: image, label (canonical; 'Infiltrate' -> 'Infiltration'), x, y, w, h
    in original-image pixels."""
    path = Path(path)
    if not path.is_file():
        raise ChexdistError(f"{path}: bounding-box CSV not found")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(raw.columns[:2]) != ["Image Index", "Finding Label"] or raw.shape[1] < 6:
        raise ChexdistError(f"{path}: expected columns 'Image Index, Finding Label, Bbox [x,y,w,h]'")
    boxes = pd.DataFrame({"image": raw.iloc[:, 0].str.strip()})
    boxes["label"] = [
        canonical_name(name, where=f"{path} row {i + 2}") for i, name in enumerate(raw.iloc[:, 1])
    ]
    for i, column in enumerate(("x", "y", "w", "h")):
        boxes[column] = pd.to_numeric(raw.iloc[:, 2 + i], errors="coerce")
    bad = boxes[["x", "y", "w", "h"]].isna().any(axis=1)
    if bad.any():
        raise ChexdistError(f"{path} row {int(bad.idxmax()) + 2}: box coordinates are not numbers")
    return boxes


def read_image_list(path: str | os.PathLike) -> list[str]:
    """NIH's train_val_list.txt / test_list.txt: one image file name per line."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


_IMAGE_DIR = re.compile(r"^images(_\d+)?$")


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map file name -> path for images under root/images/ or root/images_NNN/images/ (or
    root/images_NNN/ directly). A name found twice is an error: which copy to pack is ambiguous."""
    root = Path(root)
    folders: list[Path] = []
    if root.is_dir():
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir() and _IMAGE_DIR.match(entry.name):
                inner = Path(entry.path) / "images"
                folders.append(inner if inner.is_dir() else Path(entry.path))
    found: dict[str, Path] = {}
    for folder in folders:
        for entry in os.scandir(folder):
            if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                if entry.name in found:
                    raise ChexdistError(
                        f"{entry.path}: image also found at {found[entry.name]}; remove one copy"
                    )
                found[entry.name] = Path(entry.path)
    return found


@dataclass
class NihRelease:
    """What one NIH download folder holds, after reading its metadata."""

    root: Path
    csv_path: Path
    table: pd.DataFrame
    images: dict[str, Path]
    train_val: list[str] | None
    test: list[str] | None
    bbox_path: Path | None

    @property
    def has_official_lists(self) -> bool:
        return self.train_val is not None and self.test is not None

    @property
    def missing_images(self) -> pd.Series:
        """Rows of the table whose image file is not in the download."""
        return self.table["image"][~self.table["image"].isin(self.images.keys())]


def missing_by_folder(release: NihRelease) -> dict[str, int]:
    """Rows without an image file, counted by the image folder whose name range (its first to last
    file name) holds them, so a partly extracted archive shows as its folder; rows beyond every
    folder's range (archives not downloaded) are counted under "(no folder)"."""
    missing = np.sort(release.missing_images.to_numpy(dtype=str))
    taken = np.zeros(len(missing), dtype=bool)
    folders: dict[str, list[str]] = {}
    for name, path in release.images.items():
        folders.setdefault(path.parent.relative_to(release.root).as_posix() + "/", []).append(name)
    counts: dict[str, int] = {}
    for folder in sorted(folders):
        names = folders[folder]
        lo, hi = np.searchsorted(missing, min(names), "left"), np.searchsorted(missing, max(names), "right")
        inside = ~taken[lo:hi]
        counts[folder] = int(inside.sum())
        taken[lo:hi] = True
    counts["(no folder)"] = int((~taken).sum())
    return {folder: n for folder, n in counts.items() if n}


def load_release(root: str | os.PathLike, require_images: bool = True) -> NihRelease:
    root = Path(root)
    if not root.is_dir():
        raise ChexdistError(f"{root}: --nih-root is not a directory")
    csv_path = find_data_entry(root)
    table = read_data_entry(csv_path)
    images = find_images(root)
    if require_images and not images:
        raise ChexdistError(
            f"{root}: no images found; expected PNGs under {root}/images/ or {root}/images_001/images/"
        )
    lists = [root / TRAIN_VAL_LIST, root / TEST_LIST]
    present = [p.is_file() for p in lists]
    if any(present) and not all(present):
        raise ChexdistError(
            f"{root}: found {lists[present.index(True)].name} but not "
            f"{lists[present.index(False)].name}; the official split needs both"
        )
    train_val, test = (read_image_list(lists[0]), read_image_list(lists[1])) if all(present) else (None, None)
    return NihRelease(
        root=root,
        csv_path=csv_path,
        table=table,
        images=images,
        train_val=train_val,
        test=test,
        bbox_path=find_file(root, BBOX_NAMES),
    )
