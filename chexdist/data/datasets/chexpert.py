"""CheXpert and CheXpert-v1.0-small (`--dataset chexpert`): train.csv + valid.csv.

`--root` is the folder that holds train.csv (CheXpert-v1.0-small/) or its parent. `Path` starts with
the release folder's name, which is replaced by that folder. Of CheXpert's 14 observations, 7 are
NIH findings (Pleural Effusion as Effusion); the others (Lung Opacity, Lung Lesion, Enlarged
Cardiomediastinum, ...) are not folded into any NIH finding, so Mass, Nodule, Infiltration,
Emphysema, Fibrosis, Pleural_Thickening and Hernia are unknown. `--split official`: train.csv is
train + val (a seeded patient fraction), valid.csv (radiologist-labelled) is the test split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import (
    Dataset, DatasetTable, empty_labels, parse_label_column, read_csv, require_columns, sample_key, sha256_sources,
)  # fmt: skip
from chexdist.errors import ChexdistError

LAYOUT = "CheXpert train.csv/valid.csv"
FILES = {"train.csv": "train_val", "valid.csv": "test"}
RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
# CheXpert's observation -> NIH finding (7 of 14; the rest of CheXpert's observations map to none).
MAPPING = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *MAPPING)
SEX = {"Male": "M", "Female": "F"}
_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"/study(\d+)/")


def find_folder(root: Path) -> Path:
    """The folder that holds train.csv: `root` itself or one release folder inside it."""
    for folder in (root, *(root / name for name in RELEASES)):
        if (folder / "train.csv").is_file():
            return folder
    raise ChexdistError(f"{root}: no train.csv here or in {' or '.join(RELEASES)}/; point --root at the CheXpert download")


def views_of(frontal: pd.Series, ap_pa: pd.Series) -> pd.Series:
    """'Lateral' -> LATERAL; a frontal image takes its AP/PA value (blank -> FRONTAL)."""
    ap_pa = ap_pa.str.strip().str.upper()
    return pd.Series(np.where(frontal.str.strip() == "Lateral", "LATERAL", np.where(ap_pa == "", "FRONTAL", ap_pa)),
                     index=frontal.index)


def _read_file(folder: Path, name: str, official: str) -> pd.DataFrame:
    path = folder / name
    raw = read_csv(path, LAYOUT)
    require_columns(raw, COLUMNS, path, LAYOUT)
    rel = raw["Path"].str.strip()
    for release in RELEASES:
        rel = rel.str.replace(f"^{re.escape(release)}/", "", regex=True)
    patient = rel.str.extract(_PATIENT, expand=False)
    if patient.isna().any():
        row = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise ChexdistError(f"{path} row {row + 2}, column 'Path': {raw['Path'].iloc[row]!r} has no patientNNNNN folder")
    files = [folder / p for p in rel]
    age = pd.to_numeric(raw["Age"], errors="coerce")
    labels = empty_labels(len(raw))
    for column, finding in MAPPING.items():
        labels[finding] = parse_label_column(raw[column], path, column)
    return pd.DataFrame({
        "path": [str(f) if f.is_file() else None for f in files],
        "image": rel,
        "key": [sample_key(p) for p in rel],
        "patient_id": patient,
        "view": views_of(raw["Frontal/Lateral"], raw["AP/PA"]),
        "sex": raw["Sex"].map(SEX),
        "age": age.where(age > 0),
        "follow_up": pd.to_numeric(rel.str.extract(_STUDY, expand=False), errors="coerce"),
        "official_split": official,
        "no_finding": parse_label_column(raw["No Finding"], path, "No Finding"),
        **labels,
    })


class ChexpertDataset(Dataset):
    name = "chexpert"
    summary = "CheXpert / CheXpert-v1.0-small: train.csv + valid.csv (valid = the official test split)"

    def read(self, root: Path, options: dict) -> DatasetTable:
        folder = find_folder(Path(root))
        present = [name for name in FILES if (folder / name).is_file()]
        rows = pd.concat([_read_file(folder, name, FILES[name]) for name in present], ignore_index=True)
        return DatasetTable(
            name=self.name, root=folder, rows=rows, sources=sha256_sources(folder, [folder / n for n in present]),
            known=tuple(MAPPING.values()), mapping=dict(MAPPING), folder_depth=1,
        )


DATASET = ChexpertDataset()
