"""A hospital's own table (`--dataset csv`): one row per image, named columns chosen on the command line.

    --csv F --image-col C --patient-col C  (--label-cols A,B,... | --labels-col C [--sep '|'])
    [--view-col C] [--split-col C]

`--csv` and the image paths are relative to `--root` (or absolute). `--label-cols` lists columns of
1/0/-1/blank, each named after a finding (canonical or an alias: 'Pleural Effusion',
'Infiltrate') or given as FINDING=COLUMN; the findings not listed are unknown. `--labels-col`
holds findings separated by `--sep` ('No Finding' for none): every finding is then known. The
split column holds train, val (or valid/validate), test, or train_val (val carved from it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import (
    Dataset, DatasetTable, empty_labels, parse_label_column, read_csv, require_columns, sample_key, sha256_sources,
)  # fmt: skip
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NO_FINDING, canonical_name

LAYOUT = "--dataset csv"
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
                "test": "test", "train_val": "train_val"}
SYNONYMS = {"Pleural Effusion": "Effusion"}
OPTIONS = ("csv", "image_col", "patient_col", "label_cols", "labels_col", "sep", "view_col", "split_col")


def _finding(name: str, where: str) -> str:
    return canonical_name(SYNONYMS.get(name.strip(), name), where)


def label_columns(spec: str) -> dict[str, str]:
    """--label-cols 'Atelectasis,Effusion=pleff' -> {column: finding}."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        finding, _, column = part.partition("=") if "=" in part else (part, "", part)
        out[column.strip()] = _finding(finding, f"--label-cols {part!r}")
    return out


def _findings_column(values: pd.Series, sep: str, path: Path, column: str) -> tuple[dict, np.ndarray]:
    labels = {label: np.zeros(len(values)) for label in LABELS}
    normal = np.zeros(len(values))
    for i, text in enumerate(values.astype(str)):
        parts = [p.strip() for p in text.split(sep) if p.strip()]
        if not parts:
            raise ChexdistError(f"{path} row {i + 2}, column {column!r}: blank; write {NO_FINDING!r} for an image without findings")
        for part in parts:
            if part == NO_FINDING:
                normal[i] = 1.0
            else:
                labels[_finding(part, f"{path} row {i + 2}, column {column!r}")][i] = 1.0
    return labels, normal


def _split(values: pd.Series, path: Path, column: str) -> pd.Series:
    text = values.str.strip().str.lower()
    mapped = text.map(SPLIT_VALUES)
    bad = mapped.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ChexdistError(f"{path} row {row + 2}, column {column!r}: split {values.iloc[row]!r} is not one of "
                            f"{', '.join(SPLIT_VALUES)}")
    return mapped


class CsvDataset(Dataset):
    name = "csv"
    summary = "a hospital's own CSV: --csv F --image-col C --patient-col C and --label-cols or --labels-col"

    def add_pack_arguments(self, group) -> None:
        group.add_argument("--csv", default=None, metavar="FILE", help="csv: the table (relative to --root or absolute)")
        group.add_argument("--image-col", default=None, metavar="C", help="csv: column of image paths (relative to --root)")
        group.add_argument("--patient-col", default=None, metavar="C", help="csv: column of patient IDs")
        group.add_argument("--label-cols", default=None, metavar="A,B",
                           help="csv: 1/0/-1/blank columns named after findings, or FINDING=COLUMN")
        group.add_argument("--labels-col", default=None, metavar="C", help="csv: one column of findings separated by --sep")
        group.add_argument("--sep", default="|", help="csv: separator of --labels-col (default |)")
        group.add_argument("--view-col", default=None, metavar="C", help="csv: column of views (PA, AP, LATERAL ...)")
        group.add_argument("--split-col", default=None, metavar="C", help="csv: column of train/val/test (for --split official)")

    def options(self, args) -> dict:
        options = {k: getattr(args, k, None) for k in OPTIONS}
        for needed in ("csv", "image_col", "patient_col"):
            if not options[needed]:
                raise ChexdistError(f"--dataset csv needs --{needed.replace('_', '-')}")
        if bool(options["label_cols"]) == bool(options["labels_col"]):
            raise ChexdistError("--dataset csv needs exactly one of --label-cols A,B,... and --labels-col C")
        if options["label_cols"]:
            label_columns(options["label_cols"])
        return options

    def read(self, root: Path, options: dict) -> DatasetTable:
        root = Path(root)
        path = Path(options["csv"]) if Path(options["csv"]).is_absolute() else root / options["csv"]
        raw = read_csv(path, LAYOUT)
        columns = label_columns(options["label_cols"]) if options.get("label_cols") else {}
        wanted = [options["image_col"], options["patient_col"], *columns, options.get("labels_col"),
                  options.get("view_col"), options.get("split_col")]
        require_columns(raw, [c for c in wanted if c], path, LAYOUT)
        if columns:
            labels = empty_labels(len(raw))
            for column, finding in columns.items():
                labels[finding] = parse_label_column(raw[column], path, column)
            normal, known = np.zeros(len(raw)), tuple(f for f in LABELS if f in columns.values())
        else:
            labels, normal = _findings_column(raw[options["labels_col"]], options.get("sep") or "|", path, options["labels_col"])
            known = LABELS
        image = raw[options["image_col"]].str.strip()
        view = raw[options["view_col"]].str.strip().str.upper() if options.get("view_col") else None
        rows = pd.DataFrame({
            "path": [str(root / p) if (root / p).is_file() else None for p in image],
            "image": image,
            "key": [sample_key(p) for p in image],
            "patient_id": raw[options["patient_col"]].str.strip(),
            "view": view, "sex": None, "age": None, "follow_up": None,
            "official_split": _split(raw[options["split_col"]], path, options["split_col"]) if options.get("split_col") else None,
            "no_finding": normal,
            **labels,
        })
        return DatasetTable(name=self.name, root=root, rows=rows, sources=sha256_sources(root, [path]), known=known,
                            mapping={column: finding for column, finding in columns.items()} or {f: f for f in LABELS})


DATASET = CsvDataset()
