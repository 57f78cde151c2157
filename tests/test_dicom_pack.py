"""`--dataset dicom`: a PACS-like export whose headers AND folder names carry PHI is packed and
trained on, and no byte of the shards or the run holds any of it; labels by file or SOP Instance
UID; bad files listed and counted; predict on a DICOM equals predict on its rendered PNG."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from chexdist.data import phi
from chexdist.data.datasets.dicom import DATASET
from chexdist.data.images import load_gray8
from chexdist.data.pack import PackSettings, pack_dataset
from chexdist.data.verify import verify_shards
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from tests.test_dicom import REPO, wheel_file, write_dicom

PATIENTS = 10


def phi_of(i: int) -> dict:
    return {"PatientID": f"MRN{7340000 + i}", "PatientName": f"DOEFAMILY^JOHN{i}", "PatientBirthDate": f"1960{i + 1:02d}15",
            "AccessionNumber": f"ACC{55500 + i}", "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "HOUSE^GREGORY",
            "StudyDescription": f"CHEST PA for Mr Doefamily {i}"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """10 patients x 2 MONOCHROME1 12-bit images with rescale and window, in folders named after them."""
    root = tmp_path_factory.mktemp("pacs")
    rng = np.random.default_rng(0)
    rows, secrets = [], set()
    for i in range(PATIENTS):
        tags = phi_of(i)
        for j in range(2):
            rel = f"{tags['PatientID']}_{tags['PatientName']}/{tags['AccessionNumber']}/IM{j:04d}"
            path = write_dicom(root / "export" / rel, rng.integers(0, 4096, (40, 48)).astype(np.uint16), "MONOCHROME1", 12,
                               RescaleSlope=0.5, RescaleIntercept=10, WindowCenter=[1000, 600], WindowWidth=[1800, 400],
                               ViewPosition="PA", PatientSex="MF"[i % 2], PatientAge=f"{40 + i:03d}Y", PixelSpacing=[0.2, 0.2],
                               StudyInstanceUID=pydicom.uid.generate_uid(), **tags)
            ds = pydicom.dcmread(path)
            secrets |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), rel.split("/")[0]}
            rows.append({"file": rel, **{label: int(rng.random() < 0.4) for label in LABELS}})
        secrets |= {tags["PatientID"], tags["PatientName"], tags["PatientBirthDate"], tags["AccessionNumber"], "Elsewhere", "HOUSE", "Doefamily"}
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "key").write_text("0123456789abcdef0123456789abcdef\n")
    return root, sorted(secrets), rows


def dicom_options(root: Path, **extra) -> dict:
    return {"labels": str(root / "labels.csv"), "id_key_file": str(root / "key"), "keep_paths": False, "dicom_window": "auto", **extra}


def samples(shards: Path) -> list[dict]:
    out = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return out


def assert_no_phi(folders, secrets) -> None:
    files = [p for folder in folders for p in Path(folder).rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        data = path.read_bytes().lower()
        found = [s for s in secrets if s.lower().encode() in data]
        assert not found, f"{path} holds {found}"


@pytest.fixture(scope="module")
def packed(export, tmp_path_factory):
    root, _, _ = export
    out = tmp_path_factory.mktemp("dicom-shards") / "shards"
    manifest = pack_dataset(root / "export", out, PackSettings(dataset="dicom", dataset_options=dicom_options(root), size=32, shard_size=8), progress=False)
    return out, manifest


@pytest.mark.slow
def test_no_phi_in_shards_or_run_and_patients_are_keyed_pseudonyms(export, packed, tmp_path):
    root, secrets, rows = export
    out, manifest = packed
    assert manifest["errors"] == 0 and sum(s["samples"] for s in manifest["splits"].values()) == 2 * PATIENTS
    assert verify_shards(out)["ok"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(out), "--out", str(run), "--no-progress",
           "--set", "train.epochs=1", "--set", "data.image_size=32", "--set", "data.eval_resize=32"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "best.json").is_file()
    assert_no_phi([out, run], secrets)
    assert not [s for s in secrets if s.lower() in (done.stdout + done.stderr).lower()]  # logs too

    key = (root / "key").read_bytes().strip()
    by_patient: dict[int, set] = {}
    for meta in samples(out):
        by_patient.setdefault(meta["patient_id"], set()).add(meta["image"].split("/")[0])
        assert meta["view"] == "PA" and meta["pixel_spacing"] == [0.2, 0.2] and meta["orig_size"] == [48, 40]
    assert len(by_patient) == PATIENTS and all(len(folders) == 1 for folders in by_patient.values())
    assert set(by_patient) == {phi.patient_number(key, phi_of(i)["PatientID"]) for i in range(PATIENTS)}


def test_labels_by_sop_instance_uid_with_a_labels_column_and_a_patient_column(export, tmp_path):
    root, _, rows = export
    records = []
    for k, row in enumerate(rows):
        ds = pydicom.dcmread(root / "export" / row["file"])
        names = [label for label in LABELS if row[label]] or ["No Finding"]
        records.append({"sop_instance_uid": ds.SOPInstanceUID, "labels": "|".join(names), "patient": f"P{k // 4}"})
    pd.DataFrame(records).to_csv(tmp_path / "by_uid.csv", index=False)
    out = tmp_path / "shards"
    pack_dataset(root / "export", out, PackSettings(dataset="dicom", dataset_options=dicom_options(root, labels=str(tmp_path / "by_uid.csv")),
                                                  size=0, shard_size=50), progress=False)
    key = (root / "key").read_bytes().strip()
    metas = samples(out)
    assert len(metas) == len(rows)
    assert {m["patient_id"] for m in metas} == {phi.patient_number(key, f"P{k}") for k in range(len(rows) // 4)}
    positives = sorted(sum(m["labels"][j] for m in metas) for j in range(len(LABELS)))
    assert positives == sorted(sum(r[label] for r in rows) for label in LABELS)
    assert all(None not in m["labels"] for m in metas)  # a labels column makes every finding known


def test_bad_files_are_listed_and_counted_and_packing_goes_on(export, tmp_path):
    """Under the default --views PA,AP: files whose header does not even parse (no view) still
    reach decoding, so each is listed with its reason; errors are counted by DICOM kind; and
    errors.jsonl names failed files by pseudonym only, even inside a PHI-named folder."""
    root, secrets, rows = export
    export_copy = tmp_path / "export"
    shutil.copytree(root / "export", export_copy)
    good = (export_copy / rows[0]["file"]).read_bytes()
    (export_copy / "cut").mkdir()
    (export_copy / "cut" / "IM_truncated").write_bytes(good[:-1500])
    shutil.copy(wheel_file("rtplan.dcm"), export_copy / "cut" / "plan")
    (export_copy / "cut" / "notes.dcm").write_text("this is not a DICOM file")
    bad_folder = "MRN7349999_DOEFAMILY^BADCASE"
    (export_copy / bad_folder).mkdir()
    (export_copy / bad_folder / "IM_cut").write_bytes(good[:-1500])
    (export_copy / bad_folder / "IM_header_cut").write_bytes(good[:200])  # DICM magic, the header cut before ViewPosition: no view
    (export_copy / bad_folder / "scan.dcm").write_text("not a DICOM file either")
    names = ["cut/IM_truncated", "cut/plan", "cut/notes.dcm"] + [f"{bad_folder}/{n}" for n in ("IM_cut", "IM_header_cut", "scan.dcm")]
    extra = [{"file": name, **{label: 0 for label in LABELS}} for name in names]
    pd.DataFrame(rows + extra).to_csv(tmp_path / "labels.csv", index=False)
    options = dicom_options(root, labels=str(tmp_path / "labels.csv"))
    out = tmp_path / "shards"
    manifest = pack_dataset(export_copy, out, PackSettings(dataset="dicom", dataset_options=options, size=32), progress=False)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["image"] for e in errors) == sorted(phi.pseudonymous_path(b"0123456789abcdef0123456789abcdef", n) for n in names)
    assert all(e["path"] is None for e in errors)
    assert manifest["errors"] == 6 and manifest["left_out"] == {}
    assert manifest["error_reasons"] == {"DICOM truncated": 2, "DICOM no pixel data": 2, "DICOM not dicom": 2}
    assert sum(s["samples"] for s in manifest["splits"].values()) == len(rows)
    assert_no_phi([out], secrets + [bad_folder, "MRN7349999", "BADCASE", str(export_copy)])


def test_a_folder_without_images_is_refused_in_one_line(export, tmp_path):
    root, _, _ = export
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    settings = PackSettings(dataset="dicom", dataset_options=dicom_options(root))
    with pytest.raises(ChexdistError, match="no DICOM files found"):
        pack_dataset(empty, tmp_path / "a", settings, progress=False)
    shutil.copy(wheel_file("rtplan.dcm"), empty / "plan")
    shutil.copy(wheel_file("SC_rgb_rle.dcm"), empty / "IM1")
    with pytest.raises(ChexdistError, match=r"none of the 2 DICOM files yields an image \(1 no pixel data, 1 photometric\)"):
        pack_dataset(empty, tmp_path / "b", settings, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dicom_window_none_packs_the_full_stored_range(export, tmp_path):
    """--dicom-window none reaches the renderer: pixels differ from the default window and equal
    the full-range formula (MONOCHROME1, 12 bits, rescale 0.5/10: 0..4095 -> white..black)."""
    root, _, rows = export

    def pack(window):
        out = tmp_path / window
        manifest = pack_dataset(root / "export", out, PackSettings(dataset="dicom", size=0, views=None,
                                dataset_options=dicom_options(root, keep_paths=True, dicom_window=window)), progress=False)
        images = {}
        for tar_path in sorted(out.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members = {m.name: m for m in tar}
                for name, m in members.items():
                    if name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        png = tar.extractfile(members[name[:-5] + ".png"]).read()
                        images[meta["image"]] = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
        return manifest, images

    args = argparse.Namespace(labels=str(root / "labels.csv"), id_key_file=str(root / "key"), out=str(tmp_path / "x"), keep_paths=True, dicom_window="none")
    assert DATASET.options(args)["dicom_window"] == "none"  # the CLI option is no longer refused
    auto_manifest, auto = pack(auto_window := "auto")
    none_manifest, full = pack("none")
    assert auto_manifest["image"]["dicom_window"] == auto_window and none_manifest["image"]["dicom_window"] == "none"
    assert set(full) == set(auto) == {r["file"] for r in rows}
    for name, pixels in full.items():
        stored = pydicom.dcmread(root / "export" / name).pixel_array.astype(float)
        expected = 255 - np.rint((stored * 0.5 + 10 - 10) / (4095 * 0.5) * 255)
        assert np.abs(pixels - expected).max() <= 1, name
        assert np.abs(pixels - auto[name]).max() > 10, name


def test_keep_paths_records_the_export_paths_and_verify_reports_them(export, tmp_path):
    root, _, rows = export
    out = tmp_path / "kept"
    pack_dataset(root / "export", out, PackSettings(dataset="dicom", dataset_options=dicom_options(root, keep_paths=True), size=32), progress=False)
    assert {m["image"] for m in samples(out)} == {r["file"] for r in rows}
    report = verify_shards(out)
    assert not report["ok"] and report["problems"]
    assert all(p.startswith("PHI? ") and "DICOM person name" in p for p in report["problems"])
    assert not any("DOEFAMILY" in p for p in report["problems"])  # the report names the place, not the value


@pytest.mark.slow
def test_predict_and_cam_on_a_dicom_equal_those_on_its_rendered_png(trained_run, tmp_path):
    from chexdist.evaluation.predict import predict_files

    rng = np.random.default_rng(3)
    stored = (rng.random((160, 160)) ** 2 * 4000).astype(np.uint16)
    folder = tmp_path / "dicoms"
    dcm = write_dicom(folder / "PATIENT" / "IM0001", stored, "MONOCHROME1", 12, RescaleSlope=0.684, RescaleIntercept=200,
                      WindowCenter=1600, WindowWidth=2800)
    Image.fromarray(load_gray8(dcm)).save(tmp_path / "rendered.png")
    from_dicom = predict_files(trained_run, [folder], progress=False)  # found in the folder by content
    from_png = predict_files(trained_run, [tmp_path / "rendered.png"], progress=False)
    assert not from_dicom.failures and len(from_dicom.records) == 1
    a, b = from_dicom.records[0], from_png.records[0]
    assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    assert a["warnings"] == b["warnings"]
    # An all-zero map writes no overlay (cam_empty), so compare the first finding whose map has evidence;
    # the findings before it must be empty for both inputs alike.
    from chexdist.labels import LABELS

    for finding in sorted(LABELS, key=lambda name: -b["probabilities"][name]):
        cam_a = predict_files(trained_run, [folder], cam_dir=tmp_path / "cam-dicom", cam_finding=finding, progress=False)
        cam_b = predict_files(trained_run, [tmp_path / "rendered.png"], cam_dir=tmp_path / "cam-png", cam_finding=finding,
                              progress=False)
        assert cam_a.records[0]["cam_empty"] == cam_b.records[0]["cam_empty"], finding
        if cam_b.records[0]["cam"]:
            break
    else:
        pytest.fail("every finding's Grad-CAM map is empty for this image")
    assert (tmp_path / "cam-dicom" / f"IM0001_{finding}.png").read_bytes() == (tmp_path / "cam-png" / f"rendered_{finding}.png").read_bytes()
