"""MIMIC-CXR-JPG 2.0.0 (`--dataset mimic`): the CheXpert- (or NegBio-) labelled studies.

Files (each .csv or .csv.gz) under `--root`: mimic-cxr-2.0.0-chexpert.csv (or -negbio with
`--mimic-labeler negbio`), -metadata.csv (one row per image: dicom_id, subject_id, study_id,
ViewPosition) and -split.csv (dicom_id, split train|validate|test). Labels are per study, joined
on (subject_id, study_id); images at files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg.
The patient is subject_id. The label columns are CheXpert's, mapped as for CheXpert (7 of 14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import (
    Dataset, DatasetTable, empty_labels, find_file, parse_label_column, read_csv, require_columns, sample_key,
    sha256_sources,
)  # fmt: skip
from chexdist.data.datasets.chexpert import MAPPING
from chexdist.errors import ChexdistError

PREFIX = "mimic-cxr-2.0.0"
LAYOUT = "MIMIC-CXR-JPG 2.0.0"
LABELERS = ("chexpert", "negbio")
OFFICIAL = {"train": "train", "validate": "val", "test": "test"}
KEYS = ("subject_id", "study_id")


def _file(root: Path, suffix: str) -> Path:
    found = find_file(root, (f"{PREFIX}-{suffix}.csv",))
    if found is None:
        raise ChexdistError(f"{root}: no {PREFIX}-{suffix}.csv(.gz); point --root at the MIMIC-CXR-JPG download")
    return found


def _ids(frame: pd.DataFrame, path: Path, columns) -> None:
    for column in columns:
        bad = ~frame[column].str.strip().str.fullmatch(r"\d+")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ChexdistError(f"{path} row {row + 2}, column {column!r}: {frame[column].iloc[row]!r} is not a number")
        frame[column] = frame[column].str.strip()


def _labels(path: Path) -> pd.DataFrame:
    raw = read_csv(path, LAYOUT)
    require_columns(raw, (*KEYS, "No Finding", *MAPPING), path, LAYOUT)
    _ids(raw, path, KEYS)
    table = pd.DataFrame({k: raw[k] for k in KEYS})
    table["no_finding"] = parse_label_column(raw["No Finding"], path, "No Finding")
    for column, finding in MAPPING.items():
        table[finding] = parse_label_column(raw[column], path, column)
    return table


def _follow_up(meta: pd.DataFrame) -> pd.Series:
    """Each study's place in its subject's (shifted) timeline, when StudyDate is there."""
    if "StudyDate" not in meta.columns:
        return pd.Series(np.nan, index=meta.index)
    when = meta["StudyDate"].str.strip() + meta.get("StudyTime", pd.Series("", index=meta.index)).str.strip().str.zfill(6)
    first = meta.assign(when=when).groupby(list(KEYS))["when"].transform("min")
    return first.groupby(meta["subject_id"]).rank(method="dense") - 1


class MimicDataset(Dataset):
    name = "mimic"
    summary = "MIMIC-CXR-JPG 2.0.0: mimic-cxr-2.0.0-{chexpert,metadata,split}.csv[.gz] and files/p../"

    def add_pack_arguments(self, group) -> None:
        group.add_argument("--mimic-labeler", default="chexpert", help="mimic: chexpert (default) or negbio labels")

    def options(self, args) -> dict:
        labeler = getattr(args, "mimic_labeler", "chexpert")
        if labeler not in LABELERS:
            raise ChexdistError(f"--mimic-labeler {labeler!r}: choose one of {', '.join(LABELERS)}")
        return {"labeler": labeler}

    def read(self, root: Path, options: dict) -> DatasetTable:
        root = Path(root)
        label_path, meta_path = _file(root, options.get("labeler", "chexpert")), _file(root, "metadata")
        split_path = find_file(root, (f"{PREFIX}-split.csv",))
        meta = read_csv(meta_path, LAYOUT)
        require_columns(meta, ("dicom_id", *KEYS, "ViewPosition"), meta_path, LAYOUT)
        _ids(meta, meta_path, KEYS)
        meta["follow_up"] = _follow_up(meta)
        labels = _labels(label_path)
        joined = meta.merge(labels, on=list(KEYS), how="left", indicator=True)
        unlabelled = joined["_merge"] == "left_only"
        joined = joined[~unlabelled].reset_index(drop=True)
        official = None
        if split_path is not None:
            split = read_csv(split_path, LAYOUT)
            require_columns(split, ("dicom_id", "split"), split_path, LAYOUT)
            official = joined["dicom_id"].map(dict(zip(split["dicom_id"], split["split"].str.strip().map(OFFICIAL))))
        image = ("files/p" + joined["subject_id"].str[:2] + "/p" + joined["subject_id"] + "/s" + joined["study_id"]
                 + "/" + joined["dicom_id"].str.strip() + ".jpg")
        full = [root / p for p in image]
        rows = pd.DataFrame({
            "path": [str(f) if f.is_file() else None for f in full],
            "image": image,
            "key": [sample_key(p) for p in image],
            "patient_id": joined["subject_id"],
            "view": joined["ViewPosition"].str.strip().str.upper(),
            "sex": None, "age": None,
            "follow_up": joined["follow_up"],
            "official_split": official,
            "no_finding": joined["no_finding"],
            **{f: joined[f] if f in joined else v for f, v in empty_labels(len(joined)).items()},
        })
        paths = [label_path, meta_path] + ([split_path] if split_path is not None else [])
        return DatasetTable(
            name=self.name, root=root, rows=rows, sources=sha256_sources(root, paths),
            known=tuple(MAPPING.values()), mapping=dict(MAPPING),
            left_out={"no label row for the study": int(unlabelled.sum())} if unlabelled.any() else {},
        )


DATASET = MimicDataset()
