"""Patient-wise splits on the real table: no leakage, fractions, determinism, official lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chexdist.data import nih, splits
from chexdist.errors import ChexdistError
from tests.conftest import REAL_CSV


@pytest.fixture(scope="module")
def table(real_data):
    return nih.read_data_entry(REAL_CSV)


def _patient_sets(table, split):
    return {s: set(table.loc[split == s, "patient_id"]) for s in splits.SPLITS}


def test_random_split_of_real_table_is_patient_wise(table):
    split = splits.assign_split(table, "random", seed=0)
    sets = _patient_sets(table, split)
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(s) for s in sets.values()) == 30_805
    shares = np.array([len(sets[s]) for s in splits.SPLITS]) / 30_805
    np.testing.assert_allclose(shares, [0.7, 0.1, 0.2], atol=1e-4)
    assert split.equals(splits.assign_split(table, "random", seed=0))
    assert not split.equals(splits.assign_split(table, "random", seed=1))
    summary = splits.summarize(table, split)
    assert sum(v["images"] for v in summary.values()) == 112_120
    assert sum(v["positives"]["Hernia"] for v in summary.values()) == 227


def test_stratified_split_keeps_rare_findings_in_every_split(table):
    split = splits.assign_split(table, "random", seed=0, stratify=True)
    summary = splits.summarize(table, split)
    hernia_patients = table.loc[table["Hernia"] == 1, "patient_id"].unique()
    per_split = {s: len(set(hernia_patients) & set(table.loc[split == s, "patient_id"])) for s in splits.SPLITS}
    assert per_split["val"] >= 0.08 * len(hernia_patients) and per_split["test"] >= 0.18 * len(hernia_patients)
    assert all(summary[s]["positives"]["Hernia"] > 0 for s in splits.SPLITS)


def _lists_by_patient(table, test_share=0.2):
    patients = np.sort(table["patient_id"].unique())
    test_patients = set(patients[: int(len(patients) * test_share)])
    is_test = table["patient_id"].isin(test_patients)
    return table.loc[~is_test, "image"].tolist(), table.loc[is_test, "image"].tolist()


def test_official_split_carves_val_from_train_val_patients(table):
    sub = table.head(5000)
    train_val, test = _lists_by_patient(sub)
    split = splits.assign_split(sub, "official", train_val=train_val, test=test, val_fraction=0.1, seed=3)
    assert set(sub.loc[split == "test", "image"]) == set(test)
    sets = _patient_sets(sub, split)
    tv_patients = len(sets["train"]) + len(sets["val"])
    assert abs(len(sets["val"]) - 0.1 * tv_patients) <= 1
    assert not sets["train"] & sets["val"]


def test_overlapping_split_is_refused(table):
    sub = table.head(2000)
    train_val, test = _lists_by_patient(sub)
    leaked = sub.loc[sub["patient_id"] == sub.loc[sub["image"].isin(test), "patient_id"].iloc[0], "image"].tolist()
    assert len(leaked) > 1
    with pytest.raises(ChexdistError, match="patient leakage: 1 patient"):
        splits.assign_split(sub, "official", train_val=train_val + leaked[:1], test=[i for i in test if i != leaked[0]])
    with pytest.raises(ChexdistError, match="in neither"):
        splits.assign_split(sub, "official", train_val=train_val[1:], test=test)
    with pytest.raises(ChexdistError, match="patient leakage"):
        splits.check_no_leakage(pd.Series([1, 1, 2]), pd.Series(["train", "test", "test"]))


def test_bad_method_and_fractions(table):
    with pytest.raises(ChexdistError, match="unknown split method 'kfold'"):
        splits.assign_split(table.head(10), "kfold")
    with pytest.raises(ChexdistError, match="summing to 1"):
        splits.assign_split(table.head(10), "random", fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ChexdistError, match="needs train_val_list.txt"):
        splits.assign_split(table.head(10), "official")
