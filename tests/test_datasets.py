"""Each layout: synthesize it, pack it, read the shards back with tarfile + json (not chexdist's
reader) and compare every sample's 14 labels (1, 0, unknown), patient and view with an independent
parse of the CSV files the layout wrote. Plus the one-line errors for bad input."""

from __future__ import annotations

import ast
import contextlib
import csv
import gzip
import io
import json
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
# CheXpert / MIMIC column -> NIH finding, as the issue and docs/data.md state it.
CHEXPERT = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
            "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema"}


def run_cli(*args: str, check: bool = True) -> SimpleNamespace:
    """`chexdist ARGS` in this process (its parser, its error handling and exit code)."""
    from chexdist.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    if check and code != 0:
        pytest.fail(f"chexdist {' '.join(args)} failed: {err.getvalue()[-2000:]}")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read_csv_file(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def shard_samples(out: Path) -> dict[str, dict]:
    """image -> json of every sample in every shard, read with tarfile."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    assert meta["image"] not in samples
                    samples[meta["image"]] = meta
    return samples


def chexpert_value(text: str, normal: bool):
    if text == "1.0":
        return 1
    if text == "0.0" or (normal and text in ("", "-1.0")):
        return 0
    return None  # blank or uncertain under --uncertain ignore


def expect_chexpert(root: Path) -> dict[str, dict]:
    out = {}
    for name in ("train.csv", "valid.csv"):
        for row in read_csv_file(root / "CheXpert-v1.0-small" / name):
            if row["Frontal/Lateral"] == "Lateral":
                continue
            image = row["Path"].split("/", 1)[1]
            normal = row["No Finding"] == "1.0"
            labels = [None] * 14
            for column, finding in CHEXPERT.items():
                labels[LABELS.index(finding)] = chexpert_value(row[column], normal)
            out[image] = {"labels": labels, "patient_id": re.search(r"patient\d+", image)[0], "view": row["AP/PA"]}
    return out


def expect_mimic(root: Path) -> dict[str, dict]:
    studies = {(r["subject_id"], r["study_id"]): r for r in read_csv_file(root / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    out = {}
    for row in read_csv_file(root / "mimic-cxr-2.0.0-metadata.csv.gz"):
        if row["ViewPosition"] not in ("PA", "AP"):
            continue
        study = studies[(row["subject_id"], row["study_id"])]
        normal = study["No Finding"] == "1.0"
        labels = [None] * 14
        for column, finding in CHEXPERT.items():
            labels[LABELS.index(finding)] = chexpert_value(study[column], normal)
        s = row["subject_id"]
        image = f"files/p{s[:2]}/p{s}/s{row['study_id']}/{row['dicom_id']}.jpg"
        out[image] = {"labels": labels, "patient_id": s, "view": row["ViewPosition"]}
    return out


def expect_padchest(root: Path) -> dict[str, dict]:
    from chexdist.data.datasets.padchest import KNOWN_BROKEN, SYNONYMS

    term_to_finding = {t: f for f, terms in SYNONYMS.items() for t in terms}
    out = {}
    for row in read_csv_file(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"):
        if not row["Labels"] or row["ImageID"] in KNOWN_BROKEN or row["Projection"] == "L":
            continue
        found = {term_to_finding[t.strip()] for t in ast.literal_eval(row["Labels"]) if t.strip() in term_to_finding}
        view = "AP" if row["Projection"] == "AP_horizontal" else row["Projection"]
        out[row["ImageID"]] = {"labels": [int(f in found) for f in LABELS], "patient_id": row["PatientID"], "view": view}
    return out


def expect_csv_findings(root: Path) -> dict[str, dict]:
    out = {}
    for row in read_csv_file(root / "hospital.csv"):
        if row["view"] == "LATERAL":
            continue
        names = set(row["findings"].split("|")) - {"No Finding"}
        out[row["file"]] = {"labels": [int(f in names) for f in LABELS], "patient_id": row["patient"], "view": row["view"]}
    return out


def expect_csv_columns(root: Path) -> dict[str, dict]:
    out = {}
    for row in read_csv_file(root / "hospital.csv"):
        if row["view"] == "LATERAL":
            continue
        labels = [None] * 14
        for column, finding in (("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"), ("Pleural Effusion", "Effusion")):
            labels[LABELS.index(finding)] = {"1.0": 1, "0.0": 0}.get(row[column])
        out[row["file"]] = {"labels": labels, "patient_id": row["patient"], "view": row["view"]}
    return out


CASES = {
    "chexpert": ("chexpert", expect_chexpert, None),
    "mimic": ("mimic", expect_mimic, None),
    "padchest": ("padchest", expect_padchest, None),
    "csv-findings": ("csv", expect_csv_findings, "pack_args"),
    "csv-columns": ("csv", expect_csv_columns, "pack_args_label_cols"),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    from chexdist.data.synthlayouts import make_synthetic

    base = tmp_path_factory.mktemp("layouts")
    return {layout: (base / layout, make_synthetic(base / layout, layout, images=60, size=32, seed=3))
            for layout in ("chexpert", "mimic", "padchest", "csv")}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_packs_every_label_patient_and_view(case, layouts, tmp_path):
    layout, expect, args_key = CASES[case]
    root, summary = layouts[layout]
    out = tmp_path / "shards"
    run_cli("pack", *summary[args_key or "pack_args"], "--out", str(out), "--size", "32", "--shard-size", "25",
            "--workers", "1", "--quiet")
    got, expected = shard_samples(out), expect(root)
    assert len(expected) > 20 and set(got) == set(expected)
    for image, want in expected.items():
        meta = got[image]
        assert meta["labels"] == want["labels"], image
        assert str(meta["patient_id"]) == want["patient_id"] and meta["view"] == want["view"], image
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["dataset"] == layout
    for split, info in manifest["splits"].items():
        mine = [m for m in got.values() if m["split"] == split]
        for j, label in enumerate(LABELS):
            values = [m["labels"][j] for m in mine]
            assert (info["positives"][label], info["negatives"][label], info["unknowns"][label]) == \
                (values.count(1), values.count(0), values.count(None))
    assert sum(n for why, n in manifest["left_out"].items() if why.startswith("view")) > 0
    assert run_cli("shards", "verify", str(out), "--workers", "1").returncode == 0


def test_uncertain_policy_and_all_views(layouts, tmp_path):
    """--uncertain ones turns -1 into 1 (zeros into 0), No Finding still wins, --views all keeps laterals."""
    root, summary = layouts["chexpert"]
    raw = {}
    for name in ("train.csv", "valid.csv"):
        for row in read_csv_file(root / "CheXpert-v1.0-small" / name):
            raw[row["Path"].split("/", 1)[1]] = row
    for policy, value in (("ones", 1), ("zeros", 0)):
        out = tmp_path / policy
        run_cli("pack", *summary["pack_args"], "--out", str(out), "--size", "32", "--workers", "1", "--quiet",
                "--uncertain", policy, "--views", "all")
        got = shard_samples(out)
        assert len(got) == len(raw)  # laterals kept
        uncertain = 0
        for image, meta in got.items():
            for column, finding in CHEXPERT.items():
                if raw[image][column] == "-1.0" and raw[image]["No Finding"] != "1.0":
                    uncertain += 1
                    assert meta["labels"][LABELS.index(finding)] == value
        assert uncertain > 0
        assert json.loads((out / "manifest.json").read_text())["label_policy"]["uncertain"] == policy


def test_bad_inputs_get_one_line(layouts, tmp_path):
    root, summary = layouts["csv"]
    base = ["pack", "--root", str(root), "--out", str(tmp_path / "x"), "--workers", "1", "--quiet"]
    done = run_cli(*base, "--dataset", "nosuch", check=False)
    assert done.returncode == 2 and "known datasets: nih, chexpert, mimic, padchest, vindr, csv, dicom" in done.stderr
    done = run_cli(*base, "--dataset", "csv", "--csv", "hospital.csv", "--image-col", "file", "--patient-col", "mrn",
                   "--labels-col", "findings", check=False)
    assert done.returncode == 2 and "no column 'mrn'" in done.stderr and "'file', 'patient', 'view'" in done.stderr
    bad = tmp_path / "bad.csv"
    lines = (root / "hospital.csv").read_text().splitlines()
    lines[3] = lines[3][: lines[3].rindex(",")] + ",2"
    bad.write_text("\n".join(lines) + "\n")
    done = run_cli(*base, "--dataset", "csv", "--csv", str(bad), "--image-col", "file", "--patient-col", "patient",
                   "--label-cols", "Pleural Effusion", check=False)
    assert done.returncode == 2 and "row 4, column 'Pleural Effusion'" in done.stderr and "'2'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_images_summarised_by_folder(layouts, tmp_path):
    root, summary = layouts["chexpert"]
    copy = tmp_path / "chexpert"
    shutil.copytree(root, copy)
    removed = sorted((copy / "CheXpert-v1.0-small" / "train").iterdir())[0]
    n = sum(1 for p in removed.rglob("view1_frontal.jpg"))
    shutil.rmtree(removed)
    out = tmp_path / "shards"
    done = run_cli("pack", "--dataset", "chexpert", "--root", str(copy), "--out", str(out), "--size", "32", "--workers", "1", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["missing"]["rows"] == n and manifest["missing"]["by_folder"] == {"train/": n}
    assert f"have no image file under {copy}: {n} under train/" in done.stdout
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == n and all(e["image"].startswith(f"train/{removed.name}/") for e in errors)


def test_format_version_1_still_reads(synth_shards, tmp_path):
    """A version-1 manifest (no dataset, positives only) loads and counts negatives as the other samples."""
    from chexdist.data.shardformat import dataset_name, load_manifest, split_label_counts

    manifest = json.loads((synth_shards / "manifest.json").read_text())
    manifest["format_version"] = 1
    for key in ("dataset", "label_policy", "left_out"):
        manifest.pop(key)
    for info in manifest["splits"].values():
        info.pop("negatives"), info.pop("unknowns")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_manifest(tmp_path)
    assert dataset_name(loaded) == "nih"
    test = loaded["splits"]["test"]
    counts = split_label_counts(test)
    assert all(counts["negatives"][k] == test["samples"] - v for k, v in test["positives"].items())
    assert set(counts["unknowns"].values()) == {0}
