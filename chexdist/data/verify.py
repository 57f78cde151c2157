"""`chexdist shards verify`: re-check everything a pack's manifest claims, reading every sample as the loader does.

Each shard is re-hashed and its offset index rebuilt; each sample goes through the loader's own
:func:`chexdist.data.samples.read_sample` (parts, labels, decode), so a flagged sample is one
training would skip. The per-split patient and positive counts, and patient-disjointness across
splits, are then checked against the manifest.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.data.images import ImageDecodeError
from chexdist.data.phi import phi_problems
from chexdist.data.samples import read_sample
from chexdist.data.datasets.base import sample_key
from chexdist.data.shardformat import iter_tar, label_counts, load_manifest, sample_offsets
from chexdist.data.splits import check_no_leakage
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.utils.fileio import sha256_file


def _unread(problems: list[str]) -> dict:
    return {"problems": problems, "patients": [], **label_counts([]), "samples": 0}


def _sample_problem(exc: Exception) -> str:
    """Why the loader would skip a sample, in verify's words."""
    if isinstance(exc, ImageDecodeError):
        return f"image does not decode ({exc})"
    if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):
        return f"json does not parse ({exc})"
    return f"the loader would skip it ({exc})"


def _check_sample(where: str, key: str, parts: dict, split: str, fmt: str) -> tuple[dict | None, list[str]]:
    """(metadata, or None for a sample the loader would skip; problems) of one sample."""
    if set(parts) != {"json", fmt}:
        return None, [f"{where}/{key}: has parts {sorted(parts)}, expected json and {fmt}"]
    try:
        _, _, meta = read_sample(parts)
    except Exception as exc:  # the loader counts and skips a sample for any error, so verify reports any
        return None, [f"{where}/{key}: {_sample_problem(exc)}"]
    if meta.get("split") != split or sample_key(str(meta.get("image", ""))) != key:
        return meta, [f"{where}/{key}: json says split {meta.get('split')!r} image {meta.get('image')!r}"]
    return meta, []


def _verify_shard(args: tuple[str, dict, str, str]) -> dict:
    """Worker stage: re-hash one shard and read and decode it exactly as the training loader does."""
    path, entry, split, fmt = args
    problems: list[str] = []
    name = Path(path).name
    if not os.path.isfile(path):
        return _unread([f"{name}: file missing"])
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (corrupt or replaced)")
    try:
        groups = {sample["__key__"]: {k: v for k, v in sample.items() if not k.startswith("__")} for sample in iter_tar(path)}
    except (tarfile.TarError, OSError, ValueError) as exc:
        return _unread(problems + [f"{name}: unreadable tar ({exc})"])
    metas = []
    for key, parts in groups.items():
        meta, found = _check_sample(name, key, parts, split, fmt)
        problems += found
        if meta is not None:
            metas.append(meta)
    if len(groups) != entry["samples"]:
        problems.append(f"{name}: {len(groups)} samples, manifest says {entry['samples']}")
    if "offsets" in entry and entry["offsets"] != sample_offsets(path):
        problems.append(f"{name}: the manifest's sample offsets do not match the tar; re-pack this shard")
    return {
        "problems": problems,
        "patients": sorted({m["patient_id"] for m in metas}),
        **label_counts(metas),
        "samples": len(metas),
    }


def _split_problems(manifest: dict, jobs: list[tuple], results: list[dict]) -> list[str]:
    """Patients shared across splits, and per-split positives or patient counts unlike the manifest's."""
    problems = []
    patient_ids, split_of = [], []
    for (_, _, split, _), result in zip(jobs, results):
        patient_ids += result["patients"]
        split_of += [split] * len(result["patients"])
    try:
        check_no_leakage(pd.Series(patient_ids, dtype="object"), pd.Series(split_of, dtype="object"))
    except ChexdistError as exc:
        problems.append(str(exc))
    for split, info in manifest["splits"].items():
        mine = [r for (_, _, s, _), r in zip(jobs, results) if s == split]
        for kind in ("positives", "negatives", "unknowns"):
            if kind not in info:  # a version-1 manifest records positives only
                continue
            counts = np.sum([r[kind] for r in mine], axis=0).tolist() if mine else [0] * len(LABELS)
            if dict(zip(LABELS, counts)) != info[kind]:
                problems.append(f"{split}: {kind} per label differ from the manifest")
        if len({p for r in mine for p in r["patients"]}) != info["patients"]:
            problems.append(f"{split}: patient count differs from the manifest")
    return problems


def verify_shards(shard_dir: str | os.PathLike, workers: int = 1) -> dict:
    """Re-check everything the manifest claims. Returns {"ok", "problems", "samples", "shards"}."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    fmt = manifest["image"]["format"]
    jobs = [
        (str(shard_dir / entry["name"]), entry, split, fmt)
        for split, info in manifest["splits"].items()
        for entry in info["shards"]
    ]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_verify_shard, jobs))
    else:
        results = [_verify_shard(job) for job in jobs]
    problems = [p for r in results for p in r["problems"]] + _split_problems(manifest, jobs, results) + phi_problems(shard_dir)
    return {"ok": not problems, "problems": problems, "samples": sum(r["samples"] for r in results), "shards": len(jobs)}
