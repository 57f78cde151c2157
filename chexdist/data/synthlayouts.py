"""Synthetic datasets in the file layouts of CheXpert, MIMIC-CXR-JPG, PadChest and a hospital CSV
(`chexdist synth OUT --layout L`), drawn from the same plan and motifs as the synthetic NIH set
(`chexdist.data.synth`), so a model trained on one scores on another.

Each layout has what its reader must handle: uncertain (-1) and blank labels, No Finding rows,
lateral images (a second, lateral image in some studies), several studies per patient, and its
release's official split where it has one (CheXpert: valid.csv = the NIH plan's test patients;
MIMIC: train/validate/test). PadChest writes 16-bit PNGs, one blank Labels row and one row named
like a known-broken image of the public release (no file), which the reader leaves out.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from chexdist.data.datasets import chexpert as cx
from chexdist.data.datasets.padchest import CSV_NAME as PADCHEST_CSV
from chexdist.data.datasets.padchest import KNOWN_BROKEN, SYNONYMS
from chexdist.data.images import encode
from chexdist.data.synth import plan, render_image
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NO_FINDING
from chexdist.utils.fileio import atomic_write_bytes, atomic_write_text

LAYOUTS = ("nih", "chexpert", "mimic", "padchest", "csv")
UNCERTAIN_P = 0.15  # a positive written as -1
BLANK_P = 0.5  # a negative written blank
LATERAL_P = 0.25  # studies that also have a lateral image
CHEXPERT_OTHER = ("Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other", "Fracture", "Support Devices")
MIMIC_HEADER = ("subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices")
CSV_FINDINGS = ("Atelectasis", "Cardiomegaly", "Pleural Effusion")


def _value(positive: int, rng: np.random.Generator) -> str:
    if positive:
        return "-1.0" if rng.random() < UNCERTAIN_P else "1.0"
    return "" if rng.random() < BLANK_P else "0.0"


def _chexpert_values(labels: tuple[int, ...], rng: np.random.Generator) -> dict[str, str]:
    """The CheXpert-style columns of one study: the 7 mapped observations from the plan's labels,
    No Finding, and the unmapped observations as noise."""
    values = {column: _value(labels[LABELS.index(finding)], rng) for column, finding in cx.MAPPING.items()}
    values[NO_FINDING] = "1.0" if not any(labels) else ""
    for column in CHEXPERT_OTHER:
        values[column] = str(rng.choice(["", "0.0", "1.0", "-1.0"]))
    return values


def _images(rows, rng: np.random.Generator) -> list[tuple]:
    """(row, image index, lateral?) for each image: every study's frontal, some studies' lateral too."""
    out = []
    for row in rows:
        out.append((row, row.index, False))
        if rng.random() < LATERAL_P:
            out.append((row, len(rows) + row.index, True))
    return out


def _save(path: Path, pixels: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png16":
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint16) * 16).save(buffer, format="PNG")  # 12-bit data in 16 bits
        data = buffer.getvalue()
    else:
        data = encode(pixels, fmt, 95)
    path.write_bytes(data)  # like the NIH synth: the CSVs, written last and atomically, complete a dataset


def _csv(lines: list[list[str]]) -> str:
    def cell(v) -> str:
        v = str(v)
        return f'"{v.replace(chr(34), chr(34) * 2)}"' if any(c in v for c in ',"\n') else v
    return "".join(",".join(cell(v) for v in line) + "\n" for line in lines)


def _write_gz(path: Path, text: str) -> None:
    atomic_write_bytes(path, gzip.compress(text.encode(), mtime=0))


def _chexpert(out: Path, rows, test, size, seed, rng) -> dict:
    folder = out / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", NO_FINDING, *CHEXPERT_OTHER[:3], *cx.MAPPING, *CHEXPERT_OTHER[3:]]
    tables = {"train": [header], "valid": [header]}
    for row, index, lateral in _images(rows, rng):
        part = "valid" if row.patient in test else "train"
        rel = f"{part}/patient{row.patient:05d}/study{row.follow_up + 1}/view{2 if lateral else 1}_{'lateral' if lateral else 'frontal'}.jpg"
        _save(folder / rel, render_image(seed, index, size, row.placements), "jpg")
        values = _chexpert_values(row.labels, rng)
        tables[part].append([f"CheXpert-v1.0-small/{rel}", "Male" if row.sex == "M" else "Female", row.age,
                             "Lateral" if lateral else "Frontal", "" if lateral else row.view,
                             *(values[c] for c in header[5:])])
    for part, lines in tables.items():
        atomic_write_text(folder / f"{part}.csv", _csv(lines))
    return {"root": str(folder), "pack_args": ["--dataset", "chexpert", "--root", str(out)]}


def _mimic_split(rows, test, rng) -> dict[int, str]:
    others = sorted({r.patient for r in rows} - set(test))
    val = set(rng.permutation(others)[: max(1, len(others) // 10)].tolist())
    return {p: "test" if p in test else "validate" if p in val else "train" for p in {r.patient for r in rows}}


def _mimic(out: Path, rows, test, size, seed, rng) -> dict:
    split_of = _mimic_split(rows, test, rng)
    labels, meta, split = [list(MIMIC_HEADER)], [["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]], \
        [["dicom_id", "study_id", "subject_id", "split"]]
    seen = set()
    for row, index, lateral in _images(rows, rng):
        subject, study = 10000000 + row.patient, 50000000 + row.index
        dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5))
        path = out / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
        _save(path, render_image(seed, index, size, row.placements), "jpg")
        meta.append([dicom, subject, study, "LATERAL" if lateral else row.view, 21500101 + row.follow_up, "120000"])
        split.append([dicom, study, subject, split_of[row.patient]])
        if study not in seen:
            seen.add(study)
            values = _chexpert_values(row.labels, rng)
            labels.append([subject, study, *(values[c] for c in MIMIC_HEADER[2:])])
    for name, lines in (("chexpert", labels), ("metadata", meta), ("split", split)):
        _write_gz(out / f"mimic-cxr-2.0.0-{name}.csv.gz", _csv(lines))
    return {"root": str(out), "pack_args": ["--dataset", "mimic", "--root", str(out)]}


def _padchest(out: Path, rows, test, size, seed, rng) -> dict:
    header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
              "Projection", "Labels"]
    lines = [header]
    for row, index, lateral in _images(rows, rng):
        image = f"{seed:04d}{index:010d}_{row.patient:05d}-{row.follow_up:03d}.png"
        folder = str(index % 3)
        _save(out / folder / image, render_image(seed, index, size, row.placements), "png16")
        terms = [str(rng.choice(SYNONYMS[LABELS[i]])) for i, b in enumerate(row.labels) if b] or ["normal"]
        if rng.random() < 0.2:
            terms.append("aortic elongation")  # a term that maps to no NIH finding
        projection = "L" if lateral else ("AP_horizontal" if row.view == "AP" and rng.random() < 0.3 else row.view)
        lines.append([image, folder, 20100101 + row.follow_up * 100, f"s{row.index:06d}", f"pc{row.patient:05d}",
                      1950 + row.patient % 40, row.sex, projection, repr(terms)])
    lines.append([sorted(KNOWN_BROKEN)[0], "0", 20100101, "s-broken", "pc-broken", 1960, "F", "PA", "['normal']"])
    lines.append(["blank-labels.png", "0", 20100101, "s-blank", "pc-blank", 1960, "M", "PA", ""])
    _write_gz(out / f"{PADCHEST_CSV}.gz", _csv(lines))
    return {"root": str(out), "pack_args": ["--dataset", "padchest", "--root", str(out)]}


def _hospital(out: Path, rows, test, size, seed, rng) -> dict:
    header = ["file", "patient", "view", "split", "findings", *CSV_FINDINGS]
    lines = [header]
    for row, index, lateral in _images(rows, rng):
        rel = f"images/p{row.patient:05d}/{index:06d}.png"
        _save(out / rel, render_image(seed, index, size, row.placements), "png")
        names = [LABELS[i] for i, b in enumerate(row.labels) if b]
        per_column = [_value(row.labels[LABELS.index(cx.MAPPING.get(c, c))], rng) for c in CSV_FINDINGS]
        lines.append([rel, f"H{row.patient:05d}", "LATERAL" if lateral else row.view, "test" if row.patient in test else "train_val",
                      "|".join(names) or NO_FINDING, *per_column])
    atomic_write_text(out / "hospital.csv", _csv(lines))
    common = ["--dataset", "csv", "--root", str(out), "--csv", "hospital.csv", "--image-col", "file", "--patient-col", "patient",
              "--view-col", "view", "--split-col", "split"]
    return {"root": str(out), "pack_args": common + ["--labels-col", "findings"],
            "pack_args_label_cols": common + ["--label-cols", ",".join(CSV_FINDINGS)]}


WRITERS = {"chexpert": _chexpert, "mimic": _mimic, "padchest": _padchest, "csv": _hospital}


def make_synthetic(out: str | os.PathLike, layout: str, images: int = 120, size: int = 64, seed: int = 0) -> dict:
    """Write a synthetic dataset in `layout`'s files to `out` (an empty or new folder); returns a
    summary with the `chexdist pack` arguments that read it."""
    if layout == "nih":
        from chexdist.data.synth import make_synthetic_nih

        summary = make_synthetic_nih(out, images=images, size=size, seed=seed)
        return {**summary, "root": str(out), "pack_args": ["--dataset", "nih", "--root", str(out)]}
    if layout not in WRITERS:
        raise ChexdistError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ChexdistError(f"{out}: not empty; choose an empty folder for the synthetic {layout} dataset")
    if images < 4:
        raise ChexdistError(f"a synthetic {layout} dataset needs at least 4 images, got {images}")
    out.mkdir(parents=True, exist_ok=True)
    rows, test = plan(images, size, seed)
    rng = np.random.default_rng([seed, 0x1A40, LAYOUTS.index(layout)])
    summary = WRITERS[layout](out, rows, test, size, seed, rng)
    return {**summary, "layout": layout, "studies": len(rows), "patients": len({r.patient for r in rows})}
