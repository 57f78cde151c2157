"""The per-shard sample index: where each sample's image bytes lie, and its labels and patient.

Written at pack time beside each shard (``{shard}.idx``, a small JSON file) so that a reader of a
local shard needs one positioned read per sample and no tar or JSON parsing: the shard keeps its
json members for plain WebDataset readers and for ``chexdist shards verify``. The index is
derived from the shard itself (:func:`build_index`), so it says exactly what the tar reader would
read: the same samples in the same order, the same image part, the same label check. A sample the
tar reader would reject (no json, bad labels) is recorded with its reason and is rejected the same
way. A shard without an index (packed before it existed), or whose index does not match the file
(size, sample count, offsets), is read through the tar reader instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chexdist.data.shardformat import IMAGE_KEYS, local_path, namespaced_patient
from chexdist.labels import LABELS, NUM_LABELS, UNKNOWN
from chexdist.utils.fileio import atomic_write_text

INDEX_SUFFIX = ".idx"
INDEX_VERSION = 1
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta, as in shardformat.sample_offsets
_LABEL_ERROR = f"'labels' must be {NUM_LABELS} values 0, 1 or null in the order {', '.join(LABELS)}"


def index_path(shard: str | os.PathLike) -> str:
    return os.fspath(shard) + INDEX_SUFFIX


def _members(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The shard's samples as the tar reader groups them: key, first header offset, parts -> (data offset, size)."""
    from webdataset.tariterators import base_plus_ext

    samples: list[dict[str, Any]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "offset": member.offset, "parts": {}})
            samples[-1]["parts"][ext] = (member.offset_data, member.size)
    return samples


def _labels(meta: Any) -> list[float | None]:
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, list) or len(labels) != NUM_LABELS or any(v is not None and v not in (0, 1) for v in labels):
        raise ValueError(_LABEL_ERROR)
    return labels


def build_index(path: str | os.PathLike) -> dict[str, Any]:
    """The index of a local shard, read from the shard itself (headers, then each json member)."""
    samples = _members(path)
    index: dict[str, Any] = {"version": INDEX_VERSION, "shard_bytes": os.path.getsize(path), "samples": len(samples),
                             "keys": [], "offsets": [], "start": [], "size": [], "labels": [], "patients": [], "errors": {}}
    with open(path, "rb") as f:
        for i, sample in enumerate(samples):
            parts = sample["parts"]
            image = next((parts[k] for k in IMAGE_KEYS if k in parts), None)
            index["keys"].append(sample["key"])
            index["offsets"].append(sample["offset"])
            index["start"].append(image[0] if image else 0)
            index["size"].append(image[1] if image else 0)
            labels, patient = [None] * NUM_LABELS, None
            if image is None or "json" not in parts:
                index["errors"][str(i)] = f"sample has parts {sorted(parts)}, expected json and png/jpg"
            else:
                f.seek(parts["json"][0])
                try:
                    meta = json.loads(f.read(parts["json"][1]))
                    labels, patient = _labels(meta), meta.get("patient_id")
                except ValueError as exc:
                    index["errors"][str(i)] = str(exc)
            index["labels"].append(labels)
            index["patients"].append(patient)
    return index


def write_index(shard: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Write the index of local shard `shard` to `target` (default: beside it), atomically."""
    atomic_write_text(target if target is not None else index_path(shard), json.dumps(build_index(shard), separators=(",", ":")))


@dataclass(frozen=True)
class ShardIndex:
    """One shard's index, loaded: numpy arrays for the per-sample reads, labels float with NaN unknowns."""

    keys: list[str]
    start: np.ndarray
    size: np.ndarray
    labels: np.ndarray
    patients: list[Any]
    errors: dict[int, str]


def _as_index(raw: dict[str, Any]) -> ShardIndex:
    labels = np.array([[UNKNOWN if v is None else v for v in row] for row in raw["labels"]], dtype=np.float32)
    return ShardIndex(list(raw["keys"]), np.asarray(raw["start"], dtype=np.int64), np.asarray(raw["size"], dtype=np.int64),
                      labels.reshape(-1, NUM_LABELS), list(raw["patients"]), {int(k): v for k, v in raw["errors"].items()})


@functools.lru_cache(maxsize=1024)
def _load(path: str, size: int, mtime_ns: int, samples: int, offsets: tuple[int, ...] | None) -> ShardIndex | None:
    try:
        raw = json.loads(Path(index_path(path)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION or raw.get("shard_bytes") != size or raw.get("samples") != samples:
        return None
    if offsets is not None and tuple(raw.get("offsets", ())) != offsets:
        return None
    try:
        return _as_index(raw)
    except (KeyError, TypeError, ValueError):
        return None


def load_index(url: str, samples: int, offsets: list[int] | None = None) -> ShardIndex | None:
    """The index of a local shard if it has one that matches the file and its manifest record, else None."""
    path = local_path(url)
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _load(path, stat.st_size, stat.st_mtime_ns, samples, tuple(offsets) if offsets is not None else None)


def patient_code(dataset: str, patient: Any, mixed: bool) -> int:
    """The int64 patient code of an eval row: the patient ID itself for a single dataset with integer IDs
    (NIH), else a 63-bit hash of the namespaced ID, so patients of different datasets never share a code."""
    if patient is None:
        return -1
    if not mixed:
        try:
            return int(patient)
        except (TypeError, ValueError):
            pass
    digest = hashlib.blake2b(namespaced_patient(dataset, patient).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
