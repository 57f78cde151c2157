"""Data lineage of a run: which shards it was trained on (per source folder: the manifest's sha256,
samples and patients per split) and a digest of its training patients, so that `chexdist evaluate`
can refuse test shards that share patients with the training data.

The digest holds no patient IDs: `train_patients.json` is the sorted list of the first 16 hex
digits of sha256("dataset:patient_id") (`shardformat.namespaced_patient`); pseudonymised IDs from
hospital data stay pseudonymised, and IDs of different datasets never collide. 64 bits per
patient: a chance collision among 10^6 patients has probability ~1e-8.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from chexdist.data.shardformat import (
    MANIFEST,
    dataset_name,
    iter_tar,
    load_manifest,
    local_path,
    namespaced_patient,
    resolve,
    shard_urls,
)
from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_json

PATIENTS_FILE = "train_patients.json"
HASH_CHARS = 16


def sources(shards: str | os.PathLike | list) -> list[str]:
    """`data.shards` as a list of source folders (a mixture is a list; one folder is a str)."""
    return [str(s) for s in shards] if isinstance(shards, (list, tuple)) else [str(shards)]


def manifest_sha256(source: str, manifest: dict) -> str:
    """sha256 of the manifest file's bytes (of its canonical JSON for a remote manifest)."""
    path = local_path(resolve(source, MANIFEST))
    if path is not None and os.path.isfile(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def shards_lineage(shards: str | os.PathLike | list) -> list[dict[str, Any]]:
    """One entry per source folder: path, dataset, manifest sha256, samples and patients per split."""
    entries = []
    for source in sources(shards):
        manifest = load_manifest(source)
        entries.append({
            "shards": source,
            "dataset": dataset_name(manifest),
            "manifest_sha256": manifest_sha256(source, manifest),
            "splits": {name: {"samples": info.get("samples", 0), "patients": info.get("patients", 0)}
                       for name, info in manifest["splits"].items()},
        })
    return entries


def patient_hash(namespaced: str) -> str:
    return hashlib.sha256(namespaced.encode()).hexdigest()[:HASH_CHARS]


def _sample_metas(url: str):
    """The json member of every sample of one shard; a local tar skips image bytes by seeking."""
    path = local_path(url)
    if path is None:
        for sample in iter_tar(url):
            if "json" in sample:
                yield json.loads(sample["json"])
        return
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())


def split_patient_hashes(shards: str | os.PathLike | list, split: str) -> set[str]:
    """Hashes of the namespaced patient IDs of `split` across every source folder."""
    hashes = set()
    for source in sources(shards):
        manifest = load_manifest(source)
        dataset = dataset_name(manifest)
        for url in shard_urls(source, split, manifest):
            hashes.update(patient_hash(namespaced_patient(dataset, m["patient_id"])) for m in _sample_metas(url))
    return hashes


def write_train_patients(shards: str | os.PathLike | list, run: Path) -> dict[str, Any]:
    """Write `run`/train_patients.json (joined with the one a resumed run already has, in case
    data.shards changed); returns its summary (file, count, sha256 of the hash list)."""
    before = read_train_patients(run)
    hashes = sorted(split_patient_hashes(shards, "train") | set(before["hashes"] if before else ()))
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    atomic_write_json(run / PATIENTS_FILE, {"hash": f"sha256(dataset:patient_id)[:{HASH_CHARS}]", "count": len(hashes),
                                            "sha256": digest, "hashes": hashes})
    return {"file": PATIENTS_FILE, "count": len(hashes), "sha256": digest}


def read_train_patients(run: Path) -> dict[str, Any] | None:
    path = Path(run) / PATIENTS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_no_training_overlap(run: str | os.PathLike, shards: str | os.PathLike | list, split: str) -> None:
    """Refuse, in one line, to score `split` when its patients overlap the run's training patients
    (runs trained before lineage was recorded have no digest and are not checked)."""
    recorded = read_train_patients(Path(run))
    if recorded is None or split == "train":
        return
    overlap = split_patient_hashes(shards, split) & set(recorded["hashes"])
    if overlap:
        raise ChexdistError(
            f"{shards}: {len(overlap)} patient(s) of the {split} split are among the {recorded['count']} training patients "
            f"of {run} ({PATIENTS_FILE}); scores would be optimistic: evaluate on shards packed without those patients"
        )
