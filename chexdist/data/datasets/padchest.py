"""PadChest (`--dataset padchest`): PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) and
16-bit PNGs under `--root` (in the release's numbered folders, ImageDir/ImageID, or flat).

`Labels` is a Python-list string of report terms ("['pleural effusion', 'cardiomegaly']"). The terms
are mapped to the 14 NIH findings with the explicit :data:`SYNONYMS` table; PadChest's labels cover
the whole report, so a finding none of whose terms is listed is 0 (all 14 are known), and
'normal' is No Finding. Rows with a blank Labels cell, and the images the public release ships
broken or without (:data:`KNOWN_BROKEN`), are left out and counted. Projection AP_horizontal (supine
AP) counts as AP and L as LATERAL; age is the study year minus PatientBirth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.datasets.base import (
    Dataset, DatasetTable, find_file, read_csv, require_columns, sample_key, sha256_sources,
)  # fmt: skip
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
LAYOUT = "PadChest 160K_01.02.19"
COLUMNS = ("ImageID", "PatientID", "Projection", "Labels")
NORMAL = "normal"
# NIH finding -> the PadChest report terms that count as it (lower case, as PadChest spells them).
SYNONYMS = {
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis"),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion", "loculated pleural effusion"),
    "Infiltration": ("infiltrates", "interstitial pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "ground glass pattern"),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Hernia": ("hiatal hernia",),
}
TERM_TO_FINDING = {term: finding for finding, terms in SYNONYMS.items() for term in terms}
VIEWS = {"AP_HORIZONTAL": "AP", "L": "LATERAL"}
# Images of the public release that are absent or do not decode (truncated, or a broken PNG chunk),
# as listed by torchxrayvision's PC_Dataset (mlmed/torchxrayvision, datasets.py).
KNOWN_BROKEN = frozenset({
    "216840111366964012819207061112010307142602253_04-014-084.png",
    "216840111366964012989926673512011074122523403_00-163-058.png",
    "216840111366964012959786098432011033083840143_00-176-115.png",
    "216840111366964012558082906712009327122220177_00-102-064.png",
    "216840111366964012339356563862009072111404053_00-043-192.png",
    "216840111366964013076187734852011291090445391_00-196-188.png",
    "216840111366964012373310883942009117084022290_00-064-025.png",
    "216840111366964012283393834152009033102258826_00-059-087.png",
    "216840111366964012373310883942009170084120009_00-097-074.png",
    "216840111366964012819207061112010315104455352_04-024-184.png",
    "216840111366964012819207061112010306085429121_04-020-102.png",
    "216840111366964012989926673512011083134050913_00-168-009.png",
    "216840111366964012373310883942009152114636712_00-102-045.png",
    "216840111366964012819207061112010281134410801_00-129-131.png",
    "216840111366964012487858717522009280135853083_00-075-001.png",
    "216840111366964012989926673512011151082430686_00-157-045.png",
    "216840111366964013686042548532013208193054515_02-026-007.png",
    "216840111366964013590140476722013058110301622_02-056-111.png",
    "216840111366964013590140476722013043111952381_02-065-198.png",
    "216840111366964013829543166512013353113303615_02-092-190.png",
    "216840111366964013962490064942014134093945580_01-178-104.png",
})


def parse_terms(text: str, path: Path, row: int) -> list[str]:
    """"['a', ' b']" -> ['a', 'b']; anything but a list of strings names the row and column."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ChexdistError(f"{path} row {row + 2}, column 'Labels': {text[:60]!r} is not a Python list of terms")
    return [v.strip().lower() for v in value if v.strip()]


def label_matrix(texts: pd.Series, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(14-column 0/1 matrix, no_finding 0/1) of the Labels column, each distinct text parsed once."""
    matrix = np.zeros((len(texts), len(LABELS)))
    normal = np.zeros(len(texts))
    cache: dict[str, tuple[list[int], bool]] = {}
    for i, text in enumerate(texts):
        if text not in cache:
            terms = parse_terms(text, path, i)
            found = sorted({LABELS.index(TERM_TO_FINDING[t]) for t in terms if t in TERM_TO_FINDING})
            cache[text] = (found, NORMAL in terms)
        found, is_normal = cache[text]
        matrix[i, found] = 1.0
        normal[i] = float(is_normal)
    return matrix, normal


def _image_path(root: Path, folder: str, image: str) -> str | None:
    for candidate in ((root / folder / image) if folder else None, root / image):
        if candidate is not None and candidate.is_file():
            return str(candidate)
    return None


class PadchestDataset(Dataset):
    name = "padchest"
    summary = "PadChest: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz] and its 16-bit PNGs"

    def read(self, root: Path, options: dict) -> DatasetTable:
        root = Path(root)
        path = find_file(root, (CSV_NAME,))
        if path is None:
            raise ChexdistError(f"{root}: no {CSV_NAME}(.gz); point --root at the PadChest download")
        raw = read_csv(path, LAYOUT)
        require_columns(raw, COLUMNS, path, LAYOUT)
        blank = raw["Labels"].str.strip().isin(["", "nan"])
        broken = raw["ImageID"].str.strip().isin(KNOWN_BROKEN)
        raw = raw[~blank & ~broken].reset_index(drop=True)
        matrix, normal = label_matrix(raw["Labels"], path)
        folders = raw["ImageDir"].str.strip() if "ImageDir" in raw.columns else pd.Series("", index=raw.index)
        image = raw["ImageID"].str.strip()
        year = pd.to_numeric(raw.get("StudyDate_DICOM", pd.Series("", index=raw.index)).str[:4], errors="coerce")
        age = year - pd.to_numeric(raw.get("PatientBirth", pd.Series("", index=raw.index)), errors="coerce")
        view = raw["Projection"].str.strip().str.upper()
        when = raw.get("StudyDate_DICOM", pd.Series("", index=raw.index)).str.strip()
        study = when + "/" + (raw["StudyID"].str.strip() if "StudyID" in raw.columns else image)
        rows = pd.DataFrame({
            "path": [_image_path(root, f, i) for f, i in zip(folders, image)],
            "image": image,
            "key": [sample_key(i) for i in image],
            "patient_id": raw["PatientID"].str.strip(),
            "view": view.replace(VIEWS),
            "sex": raw.get("PatientSex_DICOM", pd.Series("", index=raw.index)).str.strip().where(lambda s: s.isin(["M", "F"])),
            "age": age.where(age >= 0),
            "follow_up": study.groupby(raw["PatientID"]).rank(method="dense") - 1,
            "official_split": None,
            "no_finding": normal,
            "folder": folders,
            **{label: matrix[:, i] for i, label in enumerate(LABELS)},
        })
        left_out = {"Labels blank": int(blank.sum()), "known broken PNG of the public release": int(broken.sum())}
        return DatasetTable(
            name=self.name, root=root, rows=rows, sources=sha256_sources(root, [path]), known=LABELS,
            mapping={term: finding for term, finding in TERM_TO_FINDING.items()},
            left_out={k: n for k, n in left_out.items() if n}, folder_depth=1,
        )


DATASET = PadchestDataset()
