"""The dataset reader interface that `chexdist pack` consumes, and the helpers every reader shares.

A dataset is a module `chexdist/data/datasets/NAME.py` that defines ``DATASET``, an instance of a
:class:`Dataset` subclass, and is listed in ``chexdist.data.datasets.REGISTRY`` (imported on use).
A reader knows one release's file layout and nothing about shards:

``name``, ``summary``
    the registry name (``chexdist pack --dataset NAME``) and one line for ``--help``.
``add_pack_arguments(group)``
    adds the dataset's own pack options to an argparse group (e.g. csv's ``--csv``, ``--image-col``;
    dicom's ``--labels``, ``--id-key-file``). Option names are shared by every dataset's group in
    one parser, so each dataset uses names no other dataset uses (or the same meaning).
``options(args) -> dict``
    the JSON-able options it takes from the parsed args. They are part of the pack's fingerprint (a
    resumed pack must use the same) and recorded in the manifest as ``dataset_options``, so they
    must hold no PHI and no secret (record a key file's name, never the key).
``read(root, options) -> DatasetTable``
    reads ``--root`` into a :class:`DatasetTable`, refusing bad input with one ChexdistError line
    (the file, the row, the column, and the fix).

A :class:`DatasetTable` holds one row per image, with columns :data:`ROW_COLUMNS` plus one column
per finding of :data:`chexdist.labels.LABELS` holding the RAW value: 1.0 positive, 0.0 negative,
-1.0 uncertain, NaN blank / not in this dataset. ``path`` is the image file (None when the file is
missing: such rows are listed in errors.jsonl and summarised in ``missing_by_folder``); ``image``
is the name written to the sample's json (no PHI), ``key`` the tar key (:func:`sample_key`),
``official_split`` is "train", "val", "test", "train_val" (val carved as a seeded patient fraction)
or None. ``no_finding`` is 1.0 where the study says No Finding. An optional ``folder`` column names
where a missing image should have been (for the missing-by-folder summary), and the optional
:data:`EXTRA_COLUMNS` fill the json's orig_size and pixel_spacing. Pack then applies the shared
:class:`LabelPolicy` (:func:`apply_policy`: ``--uncertain`` and No Finding) and the view filter
(:func:`filter_views`), so no reader implements them.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

ROW_COLUMNS = ("path", "image", "key", "patient_id", "view", "sex", "age", "follow_up", "official_split", "no_finding")
# Optional per-image facts some releases have (NIH); absent -> null in the json.
EXTRA_COLUMNS = ("orig_width", "orig_height", "spacing_x", "spacing_y")
UNCERTAIN = ("ignore", "ones", "zeros")
DEFAULT_VIEWS = ("PA", "AP")
OFFICIAL_VALUES = ("train", "val", "test", "train_val")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY = 90


@dataclass
class DatasetTable:
    """What a reader found under --root (see the module docstring for the columns of `rows`)."""

    name: str
    root: Path
    rows: pd.DataFrame
    sources: dict[str, str]  # source file name (relative to root) -> sha256; the first is the main table
    known: tuple[str, ...]  # the findings this dataset can label; the others are unknown in every row
    mapping: dict[str, str] = field(default_factory=dict)  # the dataset's term -> finding (manifest, docs)
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> rows the reader did not keep
    missing_by_folder: dict[str, int] = field(default_factory=dict)  # folder -> rows with path None
    folder_depth: int = 2  # else pack counts missing rows by the first `folder_depth` folders of `image`
    patients: str = "patient IDs from the source"  # how patient_id was derived (VinDr: one per image)
    private_paths: bool = False  # paths may carry PHI: errors.jsonl names files by `image` only

    @property
    def main_source(self) -> str:
        return next(iter(self.sources))


class Dataset:
    """One dataset's reader; subclass it and set DATASET = YourDataset() in the module."""

    name = ""
    summary = ""

    def add_pack_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add this dataset's own `chexdist pack` options (none by default)."""

    def options(self, args: argparse.Namespace) -> dict:
        """JSON-able options taken from parsed pack args (fingerprinted and recorded in the manifest)."""
        return {}

    def read(self, root: Path, options: dict) -> DatasetTable:
        raise NotImplementedError


@dataclass(frozen=True)
class LabelPolicy:
    """What pack does to every dataset's raw labels and views: recorded in the manifest."""

    uncertain: str = "ignore"  # -1 -> unknown (U-Ignore), 1 (U-Ones) or 0 (U-Zeros)
    views: tuple[str, ...] | None = DEFAULT_VIEWS  # None keeps every view (laterals too)

    def validate(self) -> None:
        if self.uncertain not in UNCERTAIN:
            raise ChexdistError(f"unknown --uncertain {self.uncertain!r}; choose one of {', '.join(UNCERTAIN)}")

    def describe(self) -> dict:
        return {"uncertain": self.uncertain, "no_finding": "No Finding = 1 makes the dataset's blank or uncertain findings 0",
                "views": list(self.views) if self.views is not None else "all"}


def parse_views(text: str) -> tuple[str, ...] | None:
    """--views 'PA,AP' -> ('PA', 'AP'); 'all' -> None."""
    text = text.strip()
    if text.lower() == "all":
        return None
    views = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    if not views:
        raise ChexdistError(f"--views {text!r}: give view names separated by commas (e.g. PA,AP) or 'all'")
    return views


def apply_policy(rows: pd.DataFrame, known: tuple[str, ...], policy: LabelPolicy) -> pd.DataFrame:
    """Raw 1/0/-1/NaN label columns -> 1/0/NaN under `policy`: No Finding = 1 first turns a known
    finding's blank or uncertain into 0; then -1 follows --uncertain; a finding the dataset does
    not have is NaN whatever the row says."""
    rows = rows.copy()
    normal = rows["no_finding"].to_numpy(dtype=float) == 1.0
    replace = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[policy.uncertain]
    for label in LABELS:
        values = rows[label].to_numpy(dtype=float).copy()
        if label not in known:
            values[:] = np.nan
        else:
            values[normal & (np.isnan(values) | (values == -1.0))] = 0.0
            values[values == -1.0] = replace
        rows[label] = values
    return rows


def filter_views(rows: pd.DataFrame, views: tuple[str, ...] | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep the rows whose view is in `views` (all when None) or not recorded at all (None: a table
    without a view column); count the others by view ('(none)' for a blank view)."""
    if views is None:
        return rows, {}
    view = rows["view"].fillna("").astype(str).str.upper()
    keep = view.isin(views) | rows["view"].isna()
    dropped = view[~keep].replace("", "(none)").value_counts()
    return rows[keep], {f"view {v}": int(n) for v, n in sorted(dropped.items())}


def sample_key(image: str) -> str:
    """The tar key of an image name: its path without the suffix, unsafe characters as '_' (NIH's
    '00000001_000.png' -> '00000001_000'); a long key is cut and made unique with a hash."""
    stem = image[: -len(Path(image).suffix)] if Path(image).suffix else image
    key = _KEY_UNSAFE.sub("_", stem).strip("_")
    if len(key) > MAX_KEY:
        import hashlib

        key = key[: MAX_KEY - 17] + "_" + hashlib.sha256(image.encode()).hexdigest()[:16]
    return key


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` (each as .csv or .csv.gz) that exists under `root`."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_csv(path: Path, layout: str) -> pd.DataFrame:
    """A CSV (or .csv.gz) as strings, blanks as ''; a file that does not parse is one line."""
    if not path.is_file():
        raise ChexdistError(f"{path}: not found; expected the {layout} layout")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            return pd.read_csv(f, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise ChexdistError(f"{path}: cannot parse as CSV ({exc})") from exc


def require_columns(frame: pd.DataFrame, columns, path: Path, layout: str) -> None:
    """Refuse a table without `columns`, naming the first missing one and listing the file's."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ChexdistError(
            f"{path}: no column {missing[0]!r} (expected by the {layout} layout); the file has columns "
            f"{', '.join(map(repr, frame.columns))}"
        )


def parse_label_column(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """A column of '1', '0', '-1' (also '1.0' ...) or blank -> float 1/0/-1/NaN; any other value
    names its row (the file's line number) and column."""
    text = values.astype(str).str.strip()
    number = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = (text != "") & ~number.isin([1.0, 0.0, -1.0])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ChexdistError(
            f"{path} row {row + 2}, column {column!r}: label {text.iloc[row]!r} is not 1, 0, -1 or blank"
        )
    return number.to_numpy(dtype=float)


def sha256_sources(root: Path, paths: list[Path]) -> dict[str, str]:
    from chexdist.utils.fileio import sha256_file

    return {os.path.relpath(p, root): sha256_file(p) for p in paths}


def missing_by_parent(rows: pd.DataFrame, depth: int = 2) -> dict[str, int]:
    """Rows whose image file is missing, counted by their optional `folder` column (e.g. PadChest's
    ImageDir), else by the first `depth` folders of their image path."""
    missing = rows[rows["path"].isna()]
    counts: dict[str, int] = {}
    for i, image in enumerate(missing["image"]):
        if "folder" in missing.columns and missing["folder"].iloc[i]:
            folder = f"{missing['folder'].iloc[i]}/"
        else:
            parts = Path(image).parts[:-1][:depth]
            folder = "/".join(parts) + "/" if parts else "(top level)"
        counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))


def empty_labels(n: int) -> dict[str, np.ndarray]:
    """All 14 findings NaN (unknown) for `n` rows: a reader fills in the ones it has."""
    return {label: np.full(n, np.nan) for label in LABELS}
