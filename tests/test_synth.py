"""The synthetic dataset has NIH's exact file formats, a patient-disjoint split, and stable pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NO_FINDING, canonical_name, parse_findings
from chexdist.data.nih import BBOX_FINDINGS
from chexdist.data.synth import (
    MOTIFS,
    Placement,
    make_synthetic_nih,
    motif_stamp,
    render_image,
)

IMAGES, SIZE, SEED = 150, 64, 3
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "nih"
    return out, make_synthetic_nih(out, images=IMAGES, size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def entries(dataset) -> pd.DataFrame:
    return pd.read_csv(dataset[0] / "Data_Entry_2017.csv")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_data_entry_is_the_2017_format(dataset, entries):
    out, _ = dataset
    lines = _lines(out / "Data_Entry_2017.csv")
    assert lines[0] == HEADER
    assert all(line.endswith(",") and line.count(",") == 11 for line in lines[1:])
    assert list(entries.columns) == COLUMNS
    assert entries["Unnamed: 11"].isna().all()
    assert len(entries) == IMAGES and entries["Image Index"].is_unique
    assert (entries["OriginalImage[Width"] == 1024).all() and (entries["Height]"] == 1024).all()
    assert set(entries["Patient Gender"]) == {"M", "F"} and set(entries["View Position"]) == {"PA", "AP"}
    assert entries["Patient Age"].between(1, 120).all()
    for row in entries.itertuples(index=False):
        assert row[0] == f"{row[3]:08d}_{row[2]:03d}.png"
    per_patient = entries.groupby("Patient ID")["Follow-up #"].agg(["min", "max", "count"])
    assert (per_patient["min"] == 0).all() and (per_patient["max"] == per_patient["count"] - 1).all()
    assert per_patient["count"].max() > 1


def test_every_listed_image_exists_with_the_right_format(dataset, entries):
    out, summary = dataset
    files = {p.name: p for p in out.glob("images_*/images/*.png")}
    assert set(files) == set(entries["Image Index"])
    assert sorted(p.name for p in out.glob("images_*")) == ["images_001", "images_002"]
    for name in entries["Image Index"][::10]:
        with Image.open(files[name]) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (SIZE, SIZE)
    assert summary["images"] == IMAGES and summary["patients"] == entries["Patient ID"].nunique()


def test_labels_use_only_nih_names_and_every_class_has_positives(dataset, entries):
    _, summary = dataset
    texts = list(entries["Finding Labels"])
    for text in texts:
        parts = text.split("|")
        assert parts == sorted(parts)
        assert all(p in LABELS for p in parts) or parts == [NO_FINDING]
    assert NO_FINDING in texts and any("|" in t for t in texts)
    counts = np.asarray([parse_findings(t) for t in texts]).sum(axis=0)
    assert (counts > 0).all()
    assert summary["positives"] == dict(zip(LABELS, counts.tolist()))
    assert summary["no_finding"] == texts.count(NO_FINDING)


def test_official_lists_are_patient_disjoint_and_cover_everything(dataset, entries):
    out, summary = dataset
    train = _lines(out / "train_val_list.txt")
    test = _lines(out / "test_list.txt")
    assert train == sorted(train) and test == sorted(test)
    assert set(train) | set(test) == set(entries["Image Index"]) and not set(train) & set(test)
    patient = dict(zip(entries["Image Index"], entries["Patient ID"]))
    train_p, test_p = {patient[n] for n in train}, {patient[n] for n in test}
    assert not train_p & test_p
    assert 0.1 < len(test_p) / (len(train_p) + len(test_p)) < 0.3
    assert summary["test_images"] == len(test) and summary["test_patients"] == len(test_p)


def test_bbox_list_format(dataset, entries):
    out, summary = dataset
    path = out / "BBox_List_2017.csv"
    assert _lines(path)[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = list(csv.reader(path.open()))[1:]
    assert rows and len(rows) == summary["boxes"]
    assert all(len(r) == 6 for r in rows)
    spellings = {r[1] for r in rows}
    assert "Infiltration" not in spellings
    assert spellings <= {"Infiltrate" if n == "Infiltration" else n for n in BBOX_FINDINGS}
    findings = dict(zip(entries["Image Index"], entries["Finding Labels"]))
    for name, label, *box in rows:
        assert canonical_name(label) in findings[name].split("|")
        x, y, w, h = map(float, box)
        assert 0 <= x and 0 <= y and x + w <= 1024 and y + h <= 1024 and w >= 1024 / 6


def test_bbox_file_parses_with_pandas(dataset):
    boxes = pd.read_csv(dataset[0] / "BBox_List_2017.csv")
    assert list(boxes.columns[:3]) == ["Image Index", "Finding Label", "Bbox [x"]
    assert boxes.iloc[:, 2:6].notna().all().all()


def test_same_seed_gives_identical_files_with_any_worker_count(dataset, tmp_path):
    out, summary = dataset
    again = make_synthetic_nih(tmp_path / "again", images=IMAGES, size=SIZE, seed=SEED, workers=2)
    for name in ("Data_Entry_2017.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    for p in sorted(out.glob("images_*/images/*.png"))[::7]:
        assert p.read_bytes() == (tmp_path / "again" / p.relative_to(out)).read_bytes()
    assert again["positives"] == summary["positives"]
    other = make_synthetic_nih(tmp_path / "other", images=IMAGES, size=SIZE, seed=SEED + 1)
    assert (tmp_path / "other" / "Data_Entry_2017.csv").read_bytes() != (out / "Data_Entry_2017.csv").read_bytes()
    assert other["images"] == IMAGES


def test_patients_argument_and_refusals(tmp_path):
    summary = make_synthetic_nih(tmp_path / "p", images=30, size=32, seed=0, patients=7)
    assert summary["patients"] == 7
    with pytest.raises(ChexdistError, match="already holds"):
        make_synthetic_nih(tmp_path / "p", images=20, size=32)
    make_synthetic_nih(tmp_path / "p", images=20, size=32, overwrite=True)
    assert len(list((tmp_path / "p").glob("images_*/images/*.png"))) == 20
    for bad in (dict(images=1), dict(size=16), dict(patients=1), dict(images=5, patients=6), dict(workers=0)):
        with pytest.raises(ChexdistError):
            make_synthetic_nih(tmp_path / "bad", **{"images": 10, **bad})


def test_motifs_are_flip_invariant_and_mutually_distinct():
    assert tuple(MOTIFS) == LABELS
    side = 16  # about what a motif measures after a resize to 64 px
    stamps = [motif_stamp(k, side) for k in range(len(LABELS))]
    for s in stamps:
        np.testing.assert_allclose(s, s[:, ::-1], atol=1e-6)
        assert np.abs(s).mean() > 0.25
    unit = [s.ravel() / np.linalg.norm(s) for s in stamps]
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            assert unit[i] @ unit[j] < 0.85, (LABELS[i], LABELS[j])


def test_motif_changes_pixels_only_inside_its_box():
    place = Placement(label=LABELS.index("Nodule"), x=20, y=30, side=40)
    plain = render_image(5, 9, 128, ()).astype(int)
    marked = render_image(5, 9, 128, (place,)).astype(int)
    changed = np.argwhere(plain != marked)
    assert changed[:, 0].min() >= 30 and changed[:, 0].max() < 70
    assert changed[:, 1].min() >= 20 and changed[:, 1].max() < 60
    assert np.abs(marked - plain)[30:70, 20:60].max() >= 60
