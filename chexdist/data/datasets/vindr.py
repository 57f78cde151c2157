"""VinDr-CXR (`--dataset vindr`): annotations/image_labels_{train,test}.csv + {train,test}/{image_id}.dicom.

The label files have one row per radiologist per image (`image_id`, `rad_id`, then one 0/1 column
per finding; the test file holds the readers' consensus); an image is positive for a finding when
ANY of its rows marks it, and No Finding only when every row says so. The column names are those
that public code reading the PhysioNet 1.0.0 release's `annotations/image_labels_train.csv` uses
("Aortic enlargement", "Atelectasis", ..., "Nodule/Mass", "Pleural effusion", "Pleural
thickening", "Pneumothorax", "Pulmonary fibrosis", ..., "No finding"; the test file spells
"Other disease" without the s); the real files were not available to check. `rad_id` is not required.

11 of VinDr's findings are NIH findings (table below and in docs/data.md). Its combined
"Nodule/Mass" cannot say which of the two an image has, so Mass and Nodule stay unknown; Hernia
is not labelled. VinDr has no patient IDs: each image is its own patient (the manifest says so).
`--split official`: the train file is train + val (a seeded fraction), the test file is test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import (
    Dataset, DatasetTable, parse_label_column, read_csv, require_columns, sample_key, sha256_sources,
)  # fmt: skip
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

LAYOUT = "VinDr-CXR annotations/image_labels_{train,test}.csv"
FILES = {"train": "train_val", "test": "test"}
# VinDr's image-level finding -> NIH finding; "Nodule/Mass" is deliberately absent (see above).
MAPPING = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural effusion": "Effusion",
    "Infiltration": "Infiltration",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": "Emphysema",
    "Pulmonary fibrosis": "Fibrosis",
    "Pleural thickening": "Pleural_Thickening",
}
NO_FINDING = "No finding"
PATIENTS = "each image is its own patient (VinDr-CXR has no patient IDs)"


def _read_file(root: Path, split: str) -> pd.DataFrame:
    path = root / "annotations" / f"image_labels_{split}.csv"
    raw = read_csv(path, LAYOUT)
    require_columns(raw, ("image_id", *MAPPING, NO_FINDING), path, LAYOUT)
    raw = raw.assign(image_id=raw["image_id"].str.strip())
    if (raw["image_id"] == "").any():
        row = int(np.flatnonzero((raw["image_id"] == "").to_numpy())[0])
        raise ChexdistError(f"{path} row {row + 2}, column 'image_id': blank")
    values = pd.DataFrame({c: parse_label_column(raw[c], path, c) for c in (*MAPPING, NO_FINDING)})
    values["image_id"] = raw["image_id"]
    grouped = values.groupby("image_id", sort=True)
    anyone = grouped[list(MAPPING)].max()  # NaN-skipping: positive if any reader marks it
    everyone = grouped[NO_FINDING].min()
    ids = anyone.index.to_list()
    files = [root / split / f"{i}.dicom" for i in ids]
    images = [f"{split}/{i}.dicom" for i in ids]
    frame = pd.DataFrame({
        "path": [str(f) if f.is_file() else None for f in files], "image": images, "key": [sample_key(i) for i in images],
        "patient_id": ids, "view": None, "sex": None, "age": None, "follow_up": None, "official_split": FILES[split],
        "no_finding": everyone.to_numpy(),
    })
    for label in LABELS:
        frame[label] = np.nan
    for column, finding in MAPPING.items():
        frame[finding] = anyone[column].to_numpy()
    return frame


class VindrDataset(Dataset):
    name = "vindr"
    summary = "VinDr-CXR: annotations/image_labels_{train,test}.csv + {train,test}/*.dicom (one patient per image)"

    def options(self, args: argparse.Namespace) -> dict:
        return {"dicom_window": "auto"}

    def read(self, root: Path, options: dict) -> DatasetTable:
        root = Path(root)
        present = [s for s in FILES if (root / "annotations" / f"image_labels_{s}.csv").is_file()]
        if not present:
            raise ChexdistError(f"{root}: no annotations/image_labels_train.csv or image_labels_test.csv; point --root at the VinDr-CXR folder (1.0.0/)")
        rows = pd.concat([_read_file(root, s) for s in present], ignore_index=True)
        sources = sha256_sources(root, [root / "annotations" / f"image_labels_{s}.csv" for s in present])
        return DatasetTable(name=self.name, root=root, rows=rows, sources=sources, known=tuple(MAPPING.values()),
                            mapping=dict(MAPPING), folder_depth=1, patients=PATIENTS)


DATASET = VindrDataset()
