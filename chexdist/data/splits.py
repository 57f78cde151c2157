"""Patient-wise splits: NIH's official lists (+ a seeded validation carve), seeded random fractions,
or a peer's own train/val/test image lists (to compare with them on their split).

Every path ends in `check_no_leakage`: a patient in two splits inflates test AUROC, so it is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NUM_LABELS

SPLITS = ("train", "val", "test")
METHODS = ("official", "random", "lists")
UNLISTED = "unlisted"  # --split lists: a CSV row in none of the lists (not packed, counted)


def _carve_patients(patients: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle patients and cut them into consecutive groups by fraction (remainder to the last)."""
    order = rng.permutation(patients)
    cuts = np.floor(np.cumsum(fractions)[:-1] * len(order) + 0.5).astype(int)
    return np.split(order, cuts)


def _stratum(table: pd.DataFrame) -> pd.Series:
    """Each patient's rarest finding (or 'none'): random splits stratified by it keep rare classes
    like Hernia in every split."""
    positives = table[list(LABELS)].fillna(0).groupby(table["patient_id"]).max()
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
    train_val_set, test_set = set(train_val), set(test)
    both = train_val_set & test_set
    if both:
        raise ChexdistError(f"{len(both)} image(s) are in both train_val_list.txt and test_list.txt, e.g. {sorted(both)[0]}")
    official = np.where(table["image"].isin(test_set), "test", np.where(table["image"].isin(train_val_set), "train_val", None))
    return official_column_split(table, pd.Series(official, index=table.index), val_fraction, seed)


def official_column_split(table: pd.DataFrame, official: pd.Series, val_fraction: float = 0.1, seed: int = 0,
                          dataset: str = "nih") -> pd.Series:
    """A release's own split (a reader's `official_split`: train, val, test, or train_val whose
    validation part is a seeded fraction of its patients, as for NIH's train_val_list)."""
    if not 0 <= val_fraction < 1:
        raise ChexdistError(f"val_fraction {val_fraction} must be in [0, 1)")
    unset = official.isna()
    if unset.any():
        where = ("train_val_list.txt nor test_list.txt" if dataset == "nih" else f"the official split of {dataset}")
        raise ChexdistError(
            f"{int(unset.sum())} image(s) of the metadata CSV are in neither {where}, "
            f"e.g. {table['image'][unset].iloc[0]}; use --split random or fix the lists"
        )
    split = official.replace("train_val", "train").rename("split")
    tv_patients = np.sort(table.loc[official == "train_val", "patient_id"].unique())
    rng = np.random.default_rng(seed)
    _, val_patients = _carve_patients(tv_patients, (1 - val_fraction, val_fraction), rng)
    split[(official == "train_val") & table["patient_id"].isin(set(val_patients.tolist()))] = "val"
    return split


def read_split_list(path: str | os.PathLike) -> tuple[list[str], dict[str, list[int]]]:
    """A peer's split file: one image name per line, optionally followed by 14 0/1 labels in
    chexdist's order (the format of arnoweng/CheXNet's labels/*_list.txt). Returns the names and
    the labels given (name -> 14 ints; empty when the file has none)."""
    names: list[str] = []
    labels: dict[str, list[int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChexdistError(f"{path}: cannot read the split list ({exc})") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        name, values = os.path.basename(parts[0]), parts[1:]
        if values:
            if len(values) != NUM_LABELS or any(v not in ("0", "1") for v in values):
                raise ChexdistError(
                    f"{path} line {number}: expected an image name, optionally followed by {NUM_LABELS} labels 0/1, "
                    f"got {len(values)} value(s) after {name!r}"
                )
            labels[name] = [int(v) for v in values]
        names.append(name)
    if not names:
        raise ChexdistError(f"{path}: the split list is empty")
    return names, labels


def lists_split(table: pd.DataFrame, lists: Mapping[str, Sequence[str]]) -> pd.Series:
    """train/val/test exactly as the given image lists say; CSV rows in no list become UNLISTED.
    An image in two lists, or listed but absent from the metadata CSV, is refused."""
    where: dict[str, str] = {}
    for name in SPLITS:
        for image in lists[name]:
            if where.get(image, name) != name:
                raise ChexdistError(f"{image} is in both the {where[image]} and the {name} list; an image belongs to one split")
            where[image] = name
    unknown = sorted(set(where) - set(table["image"]))
    if unknown:
        raise ChexdistError(
            f"{len(unknown)} listed image(s) are not in the metadata CSV, e.g. {unknown[0]} ({where[unknown[0]]} list); "
            "check the lists belong to this download"
        )
    return table["image"].map(where).fillna(UNLISTED).rename("split")


def list_label_disagreements(table: pd.DataFrame, list_labels: Mapping[str, Sequence[int]], examples: int = 5) -> dict:
    """Compare labels given in split lists with the CSV's (which are the ones packed): rows that
    differ, per finding how often, and the first few image names."""
    given = {k: v for k, v in list_labels.items()}
    rows = table[table["image"].isin(given.keys())]
    if rows.empty:
        return {"checked": 0, "rows": 0, "by_label": {label: 0 for label in LABELS}, "examples": []}
    csv_labels = rows[list(LABELS)].to_numpy(dtype=np.int64)
    list_values = np.array([given[image] for image in rows["image"]], dtype=np.int64)
    differ = csv_labels != list_values
    bad = differ.any(axis=1)
    return {
        "checked": int(len(rows)),
        "rows": int(bad.sum()),
        "by_label": {label: int(n) for label, n in zip(LABELS, differ.sum(axis=0))},
        "examples": rows["image"][bad].head(examples).tolist(),
    }


def describe_lists(table: pd.DataFrame, files: Mapping[str, str | os.PathLike]) -> dict:
    """What a --split lists pack records in its manifest: each list's file name, sha256 and length,
    CSV rows in no list, and the rows whose list labels disagree with the CSV (the CSV's are packed)."""
    from chexdist.utils.fileio import sha256_file

    read = {name: read_split_list(files[name]) for name in SPLITS}
    split = lists_split(table, {name: names for name, (names, _) in read.items()})
    given = {image: values for _, labels in read.values() for image, values in labels.items()}
    return {
        "files": {name: {"file": os.path.basename(os.fspath(files[name])), "sha256": sha256_file(files[name]),
                         "images": len(read[name][0])} for name in SPLITS},
        "unlisted_rows": int((split == UNLISTED).sum()),
        "label_disagreements": list_label_disagreements(table, given),
    }


def check_no_leakage(patient_ids: pd.Series, split: pd.Series) -> None:
    """Refuse any patient whose images fall in more than one split."""
    per_patient = pd.DataFrame({"patient_id": patient_ids, "split": split}).groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        pid = leaked.index[0]
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
    lists: Mapping[str, Sequence[str]] | None = None,
    official: pd.Series | None = None,
    dataset: str = "nih",
) -> pd.Series:
    """The single entry point the packer uses: build the split, then check it. `lists` (method
    "lists"): split name -> image names; rows in no list are UNLISTED and left out of the check.
    `official`: the reader's official_split column (takes the place of train_val/test)."""
    if method not in METHODS:
        raise ChexdistError(f"unknown split method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "official":
        if official is not None and official.notna().any():
            split = official_column_split(table, official, val_fraction=val_fraction, seed=seed, dataset=dataset)
        elif train_val is not None and test is not None:
            split = official_split(table, train_val, test, val_fraction=val_fraction, seed=seed)
        elif dataset == "nih":
            raise ChexdistError(
                "--split official needs train_val_list.txt and test_list.txt in --nih-root; use --split random"
            )
        else:
            raise ChexdistError(f"--split official: this {dataset} table has no official split; use --split random")
    elif method == "lists":
        if lists is None or any(name not in lists for name in SPLITS):
            raise ChexdistError("--split lists needs --train-list, --val-list and --test-list")
        split = lists_split(table, lists)
    else:
        split = random_split(table, fractions=fractions, seed=seed, stratify=stratify)
    listed = split != UNLISTED
    check_no_leakage(table["patient_id"][listed], split[listed])
    return split


def summarize(table: pd.DataFrame, split: pd.Series) -> dict[str, dict]:
    """Images, patients and positives per finding, per split."""
    out = {}
    for name in SPLITS:
        part = table[split == name]
        out[name] = {
            "images": int(len(part)),
            "patients": int(part["patient_id"].nunique()),
            "positives": {label: int((part[label] == 1).sum()) for label in LABELS},
        }
    return out
