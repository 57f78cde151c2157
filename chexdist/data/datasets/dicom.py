"""A hospital DICOM export (`--dataset dicom --root DIR --labels CSV`): nested patient/study/series
folders, files with or without an extension, recognised by content.

The root is walked recursively; a file is a candidate when it has the DICM magic or a .dcm/.dicom
name (so a non-DICOM file named .dcm is listed in errors.jsonl, not ignored). The labels CSV names
each image by `file` (its path relative to the root) or `sop_instance_uid`, and gives either one
column per finding (1, 0, -1 or blank; findings without a column are unknown) or a `labels` column
of findings separated by '|' (NIH style: every finding known, the listed ones positive; "No
Finding" for none; a blank cell leaves all unknown). The patient is the file's PatientID, or the
CSV's `patient` column when there is one, always pseudonymised with the key (HMAC-SHA256,
:mod:`chexdist.data.phi`); an image with neither is its own patient. The view comes from
ViewPosition. Image names in the shards are pseudonymised paths unless `--keep-paths`.

Files that cannot yield an image (truncated, no pixel data, multi-frame, colour, a missing
decoder) stay in the table with their path, so pack lists each in errors.jsonl with its reason and
counts it; a root where no file can yield an image is refused in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import Dataset, DatasetTable, empty_labels, parse_label_column, read_csv, sample_key
from chexdist.data.dicom import SUFFIXES, WINDOWS, DicomError, DicomHeader, is_dicom, read_header
from chexdist.data.phi import key_check, key_source, patient_number, pseudonymous_path, read_key
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.utils.fileio import sha256_file

NO_FINDING = "No Finding"


def candidates(root: Path) -> list[Path]:
    """Every file under `root` that is a DICOM by content or by name, sorted; hidden files skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and (name.lower().endswith(SUFFIXES) or is_dicom(path)):
                found.append(path)
    return found


def _labels(table: pd.DataFrame, path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...]]:
    """(raw label columns, no_finding, the findings this CSV labels) from finding columns or `labels`."""
    out = empty_labels(len(table))
    no_finding = np.zeros(len(table))
    if "labels" in table.columns:
        for i, cell in enumerate(table["labels"].astype(str)):
            names = [n.strip() for n in cell.split("|") if n.strip()]
            unknown = [n for n in names if n not in LABELS and n != NO_FINDING]
            if unknown:
                raise ChexdistError(f"{path} row {i + 2}, column 'labels': {unknown[0]!r} is not one of the 14 findings or {NO_FINDING!r}")
            if names:
                for label in LABELS:
                    out[label][i] = 1.0 if label in names else 0.0
                no_finding[i] = float(names == [NO_FINDING])
        return out, no_finding, LABELS
    known = tuple(label for label in LABELS if label in table.columns)
    if not known:
        raise ChexdistError(f"{path}: no finding columns ({', '.join(LABELS[:3])}, ...) and no 'labels' column")
    for label in known:
        out[label] = parse_label_column(table[label], path, label)
    if NO_FINDING in table.columns:
        no_finding = np.nan_to_num(parse_label_column(table[NO_FINDING], path, NO_FINDING)) == 1.0
    return out, no_finding.astype(float), known


def _headers(files: list[Path], root: Path, key: bytes) -> dict[Path, DicomHeader | str]:
    """Each candidate's kept header fields, or the reason its header does not parse."""
    out: dict[Path, DicomHeader | str] = {}
    for path in files:
        try:
            out[path] = read_header(path, key, name=os.path.relpath(path, root))
        except DicomError as exc:
            out[path] = exc.kind
        except OSError as exc:
            out[path] = f"unreadable ({exc.strerror})"
    return out


def _match(table: pd.DataFrame, labels_path: Path, root: Path, headers: dict) -> list[Path | None]:
    """The file of each CSV row (None when it is not under the root)."""
    if "file" in table.columns:
        return [(root / f) if (root / f).is_file() else None for f in table["file"].astype(str).str.strip()]
    if "sop_instance_uid" not in table.columns:
        raise ChexdistError(f"{labels_path}: needs a 'file' column (paths relative to --root) or a 'sop_instance_uid' column")
    by_uid = {h.sop_instance_uid: p for p, h in headers.items() if isinstance(h, DicomHeader) and h.sop_instance_uid}
    return [by_uid.get(uid) for uid in table["sop_instance_uid"].astype(str).str.strip()]


def _refuse_empty(root: Path, files: list[Path], headers: dict) -> None:
    if not files:
        raise ChexdistError(f"{root}: no DICOM files found (none has the DICM magic or a .dcm name); is --root the export folder?")
    if not any(isinstance(h, DicomHeader) and h.problem is None for h in headers.values()):
        kinds: dict[str, int] = {}
        for h in headers.values():
            kind = h.problem if isinstance(h, DicomHeader) else h
            kinds[kind] = kinds.get(kind, 0) + 1
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
        raise ChexdistError(f"{root}: none of the {len(files)} DICOM files yields an image ({why})")


class DicomDataset(Dataset):
    name = "dicom"
    summary = "a DICOM export (nested folders, any file names) + a labels CSV keyed by file or sop_instance_uid"

    def add_pack_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--labels", metavar="CSV", help="labels CSV: 'file' or 'sop_instance_uid', then finding columns or 'labels'")
        group.add_argument("--id-key-file", metavar="FILE", help="pseudonymisation key (else $CHEXDIST_ID_KEY, else a new key written beside --out)")
        group.add_argument("--keep-paths", action="store_true", help="record the export's file paths as they are (they may carry PHI)")
        group.add_argument("--dicom-window", choices=WINDOWS, default="auto", help="auto: the file's VOI LUT or first window; none: the full stored range")

    def options(self, args: argparse.Namespace) -> dict:
        if not getattr(args, "labels", None):
            raise ChexdistError("--dataset dicom needs --labels CSV (a 'file' or 'sop_instance_uid' column and the findings)")
        key_file, where = key_source(getattr(args, "id_key_file", None), args.out)
        print(f"chexdist pack: patient IDs and paths are pseudonymised with the key in {where}", file=sys.stderr)
        return {"labels": os.path.abspath(args.labels), "id_key_file": key_file, "key_check": key_check(read_key(key_file)),
                "keep_paths": bool(args.keep_paths), "dicom_window": args.dicom_window}

    def read(self, root: Path, options: dict) -> DatasetTable:
        root = Path(root)
        if not root.is_dir():
            raise ChexdistError(f"--root {root}: not a folder")
        key = read_key(options.get("id_key_file"))
        if options.get("key_check") and key_check(key) != options["key_check"]:
            raise ChexdistError(f"the pseudonymisation key differs from the one this pack was started with ({options.get('id_key_file') or '$CHEXDIST_ID_KEY'})")
        labels_path = Path(options["labels"])
        table = read_csv(labels_path, "DICOM labels")
        files = candidates(root)
        headers = _headers(files, root, key)
        _refuse_empty(root, files, headers)
        paths = _match(table, labels_path, root, headers)
        raw, no_finding, known = _labels(table, labels_path)
        rows = [self._row(i, p, headers.get(p), table, root, key, options) for i, p in enumerate(paths)]
        frame = pd.DataFrame(rows, index=table.index)
        for label in LABELS:
            frame[label] = raw[label]
        frame["no_finding"] = no_finding
        listed = {p for p in paths if p is not None}
        left_out = {"DICOM files not in the labels CSV": sum(1 for f in files if f not in listed)}
        return DatasetTable(
            name=self.name, root=root, rows=frame, sources={labels_path.name: sha256_file(labels_path)}, known=known,
            mapping={label: label for label in known}, left_out={k: v for k, v in left_out.items() if v},
            patients="pseudonymised PatientID (HMAC-SHA256)" if "patient" not in table.columns else "pseudonymised 'patient' column (HMAC-SHA256)",
            private_paths=not options.get("keep_paths"),
        )

    @staticmethod
    def _row(i: int, path: Path | None, header, table: pd.DataFrame, root: Path, key: bytes, options: dict) -> dict:
        """One table row; the name written to the shards is pseudonymised unless keep_paths."""
        if "file" in table.columns:
            relative = str(table["file"].iloc[i]).strip()
        else:
            relative = os.path.relpath(path, root) if path is not None else f"uid/{table['sop_instance_uid'].iloc[i]}"
        image = relative if options.get("keep_paths") and path is not None else pseudonymous_path(key, relative)
        header = header if isinstance(header, DicomHeader) else None
        patient = str(table["patient"].iloc[i]).strip() if "patient" in table.columns else ""
        if patient:
            patient_id = patient_number(key, patient)
        else:
            patient_id = header.patient if header and header.patient is not None else patient_number(key, f"image:{relative}")
        width, height = header.size if header else (None, None)
        spacing_x, spacing_y = header.pixel_spacing if header else (None, None)
        return {
            "path": str(path) if path is not None else None, "image": image, "key": sample_key(image), "patient_id": patient_id,
            "view": header.view if header else None, "sex": header.sex if header else None, "age": header.age if header else None,
            "follow_up": None, "official_split": None, "orig_width": width, "orig_height": height,
            "spacing_x": spacing_x, "spacing_y": spacing_y,
        }


DATASET = DicomDataset()
