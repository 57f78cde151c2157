"""`--dataset vindr`: a synthetic VinDr-CXR folder (one label row per radiologist, DICOM images
built with set_pixel_data) packed and read back with tarfile + json, against an independent parse."""

from __future__ import annotations

import csv
import json
import tarfile

import numpy as np
import pytest

from chexdist.data.pack import PackSettings, pack_dataset
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from tests.test_dicom import write_dicom

# A subset of the release's 28 columns, in its order; the reader needs the mapped ones + No finding.
COLUMNS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "Edema", "Emphysema",
           "ILD", "Infiltration", "Lung Opacity", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
           "Pulmonary fibrosis", "Pneumonia", "Tuberculosis", "No finding"]
NIH_OF = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural effusion": "Effusion", "Infiltration": "Infiltration",
          "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
          "Emphysema": "Emphysema", "Pulmonary fibrosis": "Fibrosis", "Pleural thickening": "Pleural_Thickening"}


@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr")
    rng = np.random.default_rng(1)
    (root / "annotations").mkdir()
    for split, images, readers in (("train", 8, 3), ("test", 4, 1)):
        with open(root / "annotations" / f"image_labels_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "rad_id", *COLUMNS])
            for i in range(images):
                image_id = f"{split[:2]}{i:02d}" + "%028x" % int(rng.integers(0, 2**62))
                write_dicom(root / split / f"{image_id}.dicom", rng.integers(0, 4096, (36, 40)).astype(np.uint16), "MONOCHROME2", 12)
                for r in range(readers):
                    marks = (rng.random(len(COLUMNS) - 1) < 0.25).astype(int).tolist()
                    writer.writerow([image_id, f"R{r + 1}", *marks, int(not any(marks))])
    return root


def expected(root) -> dict[str, dict]:
    """Independent parse: any reader's 1 makes a mapped finding positive; Mass, Nodule, Hernia unknown."""
    out: dict[str, dict] = {}
    for split in ("train", "test"):
        with open(root / "annotations" / f"image_labels_{split}.csv", newline="") as f:
            for row in csv.DictReader(f):
                entry = out.setdefault(f"{split}/{row['image_id']}.dicom", {"split": split, "labels": {n: 0 for n in NIH_OF.values()}})
                for column, finding in NIH_OF.items():
                    entry["labels"][finding] = max(entry["labels"][finding], int(row[column]))
    return out


def test_vindr_pack_reads_back_any_reader_labels_and_one_patient_per_image(vindr, tmp_path):
    manifest = pack_dataset(vindr, tmp_path / "shards", PackSettings(dataset="vindr", split="official", val_fraction=0.25, size=0,
                                                                     dataset_options={"dicom_window": "auto"}), progress=False)
    samples = []
    for tar_path in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = [m.name for m in tar]
            samples += [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
            assert all(n.endswith((".json", ".png")) for n in names)
    truth = expected(vindr)
    assert manifest["errors"] == 0 and sorted(s["image"] for s in samples) == sorted(truth)
    for sample in samples:
        want = truth[sample["image"]]
        assert sample["labels"] == [want["labels"].get(label) for label in LABELS], sample["image"]
        assert (sample["split"] == "test") == (want["split"] == "test")
        assert sample["patient_id"] == sample["image"].split("/")[1][: -len(".dicom")]
    assert sum(s["labels"][LABELS.index("Effusion")] for s in samples) > 0  # the mapping is exercised
    assert manifest["patients"].startswith("each image is its own patient")
    assert manifest["label_policy"]["known"] == [label for label in LABELS if label not in ("Mass", "Nodule", "Hernia")]
    assert manifest["image"]["dicom_window"] == "auto"
    assert {s["split"] for s in samples} == {"train", "val", "test"}


def test_vindr_missing_column_names_it(vindr, tmp_path):
    root = tmp_path / "v"
    (root / "annotations").mkdir(parents=True)
    text = (vindr / "annotations" / "image_labels_train.csv").read_text().replace("Pleural effusion", "Effusion", 1)
    (root / "annotations" / "image_labels_train.csv").write_text(text)
    with pytest.raises(ChexdistError, match="no column 'Pleural effusion'"):
        pack_dataset(root, tmp_path / "out", PackSettings(dataset="vindr"), progress=False)
