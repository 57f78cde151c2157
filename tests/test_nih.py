"""NIH metadata parsing against the real 112,120-row table and hand-made edge cases."""

from __future__ import annotations

import gzip
import shutil

import pandas as pd
import pytest

from chexdist.data import nih
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, check_labels, parse_findings
from tests.conftest import REAL_BBOX, REAL_CSV

# shared/data/README.md, label prevalence of the v2020 table.
PREVALENCE = {
    "Infiltration": 19894, "Effusion": 13317, "Atelectasis": 11559, "Nodule": 6331, "Mass": 5782,
    "Pneumothorax": 5302, "Consolidation": 4667, "Pleural_Thickening": 3385, "Cardiomegaly": 2776,
    "Emphysema": 2516, "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227,
}


@pytest.fixture(scope="module")
def real_table(real_data):
    return nih.read_data_entry(REAL_CSV)


def test_full_real_table(real_table):
    assert len(real_table) == 112_120
    assert real_table["patient_id"].nunique() == 30_805
    assert real_table[list(LABELS)].sum().to_dict() == PREVALENCE
    assert int((real_table[list(LABELS)].sum(axis=1) == 0).sum()) == 60_361  # "No Finding"
    first = real_table.iloc[0]
    assert (first["image"], first["patient_id"], first["age"], first["sex"]) == ("00000001_000.png", 1, 57, "M")
    assert (first["orig_width"], first["orig_height"]) == (2682, 2749)


def _rows_as_2017_csv(real_table_head: pd.DataFrame, path):
    """Write rows in the original 2017 layout: header and every line end with a comma."""
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    lines = [header] + [
        f"{r.image},{r.findings},{r.follow_up},{r.patient_id},{r.age},{r.sex},{r.view},"
        f"{r.orig_width},{r.orig_height},{r.spacing_x},{r.spacing_y},"
        for r in real_table_head.itertuples()
    ]
    path.write_text("\n".join(lines) + "\n")


def test_2017_trailing_comma_and_plain_csv(real_table, tmp_path):
    head = real_table.head(50)
    _rows_as_2017_csv(head, tmp_path / "Data_Entry_2017.csv")
    parsed = nih.read_data_entry(tmp_path / "Data_Entry_2017.csv")
    pd.testing.assert_frame_equal(parsed, head.reset_index(drop=True), check_dtype=False)
    gz = tmp_path / "gz"
    gz.mkdir()
    with open(tmp_path / "Data_Entry_2017.csv", "rb") as src, gzip.open(gz / "Data_Entry_2017.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert nih.find_data_entry(gz).name == "Data_Entry_2017.csv.gz"
    pd.testing.assert_frame_equal(nih.read_data_entry(gz / "Data_Entry_2017.csv.gz"), parsed)


def test_unknown_finding_names_the_row(real_table, tmp_path):
    head = real_table.head(5).copy()
    head.loc[2, "findings"] = "Effusion|Pneumonitis"
    _rows_as_2017_csv(head, tmp_path / "Data_Entry_2017.csv")
    with pytest.raises(ChexdistError, match=r"row 4: unknown finding 'Pneumonitis'"):
        nih.read_data_entry(tmp_path / "Data_Entry_2017.csv")


def test_missing_csv_and_columns(tmp_path):
    with pytest.raises(ChexdistError, match="no Data_Entry_2017"):
        nih.find_data_entry(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Labels\nx.png,Mass\n")
    with pytest.raises(ChexdistError, match="missing column"):
        nih.read_data_entry(tmp_path / "Data_Entry_2017.csv")


def test_parse_findings_and_label_order():
    assert parse_findings("No Finding") == [0] * 14
    vector = parse_findings("Hernia|Atelectasis")
    assert vector[0] == 1 and vector[13] == 1 and sum(vector) == 2
    check_labels(list(LABELS), "x")
    swapped = list(LABELS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ChexdistError, match="label order differs .* position 0"):
        check_labels(swapped, "ckpt.json")
    with pytest.raises(ChexdistError, match="missing"):
        check_labels(list(LABELS[:13]), "ckpt.json")


def test_real_bbox_list(real_data):
    boxes = nih.read_bbox_list(REAL_BBOX)
    assert len(boxes) == 984 and boxes["image"].nunique() == 880
    assert "Infiltration" in set(boxes["label"]) and "Infiltrate" not in set(boxes["label"])
    assert set(boxes["label"]) <= set(LABELS)
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes["w"] > 0).all()


def test_find_images_in_both_layouts(tmp_path):
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    (tmp_path / "images_001" / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "images_002" / "images" / "b.png").write_bytes(b"x")
    assert sorted(nih.find_images(tmp_path)) == ["a.png", "b.png"]
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "images" / "c.png").write_bytes(b"x")
    (flat / "images" / "notes.txt").write_bytes(b"x")
    assert list(nih.find_images(flat)) == ["c.png"]
    (tmp_path / "images_002" / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(ChexdistError, match="also found"):
        nih.find_images(tmp_path)
