"""NIH ChestX-ray14 (`--dataset nih`, the default; `--nih-root` is `--root`): chexdist.data.nih's
reader as a DatasetTable. Every finding is known (0/1), views are PA/AP, and the official split
comes from train_val_list.txt / test_list.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import Dataset, DatasetTable, sha256_sources
from chexdist.data.nih import load_release, missing_by_folder
from chexdist.labels import LABELS


class NihDataset(Dataset):
    name = "nih"
    summary = "NIH ChestX-ray14: Data_Entry_2017*.csv[.gz], images/ or images_NNN/images/, official lists"

    def read(self, root: Path, options: dict) -> DatasetTable:
        release = load_release(root)
        table = release.table
        official = None
        if release.has_official_lists:
            official = np.where(table["image"].isin(set(release.test)), "test",
                                np.where(table["image"].isin(set(release.train_val)), "train_val", None))
        rows = pd.DataFrame({
            "path": [str(p) if p is not None else None for p in map(release.images.get, table["image"])],
            "image": table["image"],
            "key": [Path(name).stem for name in table["image"]],
            "patient_id": table["patient_id"],
            "view": table["view"],
            "sex": table["sex"],
            "age": table["age"].where(table["age"] >= 0, None).astype(object),
            "follow_up": table["follow_up"],
            "official_split": official,
            "no_finding": (table[list(LABELS)].sum(axis=1) == 0).astype(float),
            **{c: table[c] for c in ("orig_width", "orig_height", "spacing_x", "spacing_y")},
            **{label: table[label].astype(float) for label in LABELS},
        }, index=table.index)
        return DatasetTable(
            name=self.name, root=Path(root), rows=rows, sources=sha256_sources(Path(root), [release.csv_path]),
            known=LABELS, mapping={label: label for label in LABELS},
            missing_by_folder=missing_by_folder(release) if rows["path"].isna().any() else {},
        )


DATASET = NihDataset()
