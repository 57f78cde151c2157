"""Patient-wise splits: NIH's official lists (+ a seeded validation carve), or seeded random fractions.

Every path ends in `check_no_leakage`: a patient in two splits inflates test AUROC, so it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

SPLITS = ("train", "val", "test")
METHODS = ("official", "random")


def _carve_patients(patients: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle patients and cut them into consecutive groups by fraction (remainder to the last)."""
    order = rng.permutation(patients)
    cuts = np.floor(np.cumsum(fractions)[:-1] * len(order) + 0.5).astype(int)
    return np.split(order, cuts)


def _stratum(table: pd.DataFrame) -> pd.Series:
    """Each patient's rarest finding (or 'none'): random splits stratified by it keep rare classes
    like Hernia in every split."""
    positives = table.groupby("patient_id")[list(LABELS)].max()
    prevalence = positives.sum()
    rank = {label: i for i, label in enumerate(prevalence.sort_values(kind="stable").index)}
    rarest = positives.apply(
        lambda row: min((label for label in LABELS if row[label]), key=rank.get, default="none"), axis=1
    )
    return rarest


def random_split(
    table: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: bool = False,
) -> pd.Series:
    """Assign whole patients to train/val/test by fraction of patients."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ChexdistError(f"split fractions {list(fractions)} must be three non-negative numbers summing to 1")
    rng = np.random.default_rng(seed)
    patient_split: dict[int, str] = {}
    if stratify:
        strata = _stratum(table)
        groups = [strata.index[strata == s].to_numpy() for s in sorted(strata.unique())]
    else:
        groups = [np.sort(table["patient_id"].unique())]
    for patients in groups:
        for name, part in zip(SPLITS, _carve_patients(patients, fractions, rng)):
            patient_split.update(dict.fromkeys(part.tolist(), name))
    return table["patient_id"].map(patient_split).rename("split")


def official_split(
    table: pd.DataFrame,
    train_val: Sequence[str],
    test: Sequence[str],
    val_fraction: float = 0.1,
    seed: int = 0,
) -> pd.Series:
    """NIH's train_val_list/test_list; validation = a seeded fraction of train_val's patients."""
    if not 0 <= val_fraction < 1:
        raise ChexdistError(f"val_fraction {val_fraction} must be in [0, 1)")
    train_val_set, test_set = set(train_val), set(test)
    both = train_val_set & test_set
    if both:
        raise ChexdistError(f"{len(both)} image(s) are in both train_val_list.txt and test_list.txt, e.g. {sorted(both)[0]}")
    in_list = table["image"].isin(train_val_set | test_set)
    if not in_list.all():
        example = table["image"][~in_list].iloc[0]
        raise ChexdistError(
            f"{int((~in_list).sum())} image(s) of the metadata CSV are in neither train_val_list.txt nor "
            f"test_list.txt, e.g. {example}; use --split random or fix the lists"
        )
    split = pd.Series(np.where(table["image"].isin(test_set), "test", "train"), index=table.index, name="split")
    tv_patients = np.sort(table.loc[split == "train", "patient_id"].unique())
    rng = np.random.default_rng(seed)
    _, val_patients = _carve_patients(tv_patients, (1 - val_fraction, val_fraction), rng)
    split[(split == "train") & table["patient_id"].isin(set(val_patients.tolist()))] = "val"
    return split


def check_no_leakage(patient_ids: pd.Series, split: pd.Series) -> None:
    """Refuse any patient whose images fall in more than one split."""
    per_patient = pd.DataFrame({"patient_id": patient_ids, "split": split}).groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        pid = int(leaked.index[0])
        where = sorted(split[patient_ids == pid].unique())
        raise ChexdistError(
            f"patient leakage: {len(leaked)} patient(s) appear in more than one split, "
            f"e.g. patient {pid} in {where}; a patient's images must all be in one split"
        )


def assign_split(
    table: pd.DataFrame,
    method: str,
    train_val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: bool = False,
) -> pd.Series:
    """The single entry point the packer uses: build the split, then check it."""
    if method not in METHODS:
        raise ChexdistError(f"unknown split method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "official":
        if train_val is None or test is None:
            raise ChexdistError(
                "--split official needs train_val_list.txt and test_list.txt in --nih-root; use --split random"
            )
        split = official_split(table, train_val, test, val_fraction=val_fraction, seed=seed)
    else:
        split = random_split(table, fractions=fractions, seed=seed, stratify=stratify)
    check_no_leakage(table["patient_id"], split)
    return split


def summarize(table: pd.DataFrame, split: pd.Series) -> dict[str, dict]:
    """Images, patients and positives per finding, per split."""
    out = {}
    for name in SPLITS:
        part = table[split == name]
        out[name] = {
            "images": int(len(part)),
            "patients": int(part["patient_id"].nunique()),
            "positives": {label: int(part[label].sum()) for label in LABELS},
        }
    return out
