"""The manifest a pack writes (format version 2): what was packed, from what, under which label
policy, and per split and finding its positives, negatives and unknowns. See shards/README.md."""

from __future__ import annotations

import numpy as np

from chexdist import __version__
from chexdist.data.images import summarize_statistics
from chexdist.data.shardformat import FORMAT_VERSION, split_label_counts
from chexdist.data.splits import SPLITS, describe_lists
from chexdist.labels import LABELS


def unscorable_splits(manifest: dict) -> dict[str, dict[str, str]]:
    """Per evaluation split (val, test), the findings it cannot score: AUROC needs both known
    positives and known negatives, so such a finding is null in every metric of that split."""
    found = {}
    for name in ("val", "test"):
        info = manifest["splits"].get(name)
        if info is None:
            continue
        counts = split_label_counts(info)
        reasons = {}
        for label in manifest["labels"]:
            pos, neg, unknown = counts["positives"][label], counts["negatives"][label], counts["unknowns"][label]
            if pos == 0 and neg == 0:
                reasons[label] = "unknown in every sample" if unknown else "no samples"
            elif pos == 0 or neg == 0:
                reasons[label] = "no positives" if pos == 0 else "no negatives"
        if reasons:
            found[name] = reasons
    return found


def _split_statistics(records: list[dict], split: str) -> dict | None:
    """None when a shard of the split was packed before statistics were recorded (a resumed old pack)."""
    mine = [r for r in records if r["split"] == split]
    if any("image_stats" not in r for r in mine):
        return None
    return summarize_statistics([row for r in mine for row in r["image_stats"]])


def _splits(records: list[dict]) -> dict:
    splits = {}
    for name in SPLITS:
        mine = [r for r in records if r["split"] == name]
        counts = {}
        for kind in ("positives", "negatives", "unknowns"):
            total = np.sum([r[kind] for r in mine], axis=0).tolist() if mine else [0] * len(LABELS)
            counts[kind] = dict(zip(LABELS, (int(v) for v in total)))
        splits[name] = {
            "samples": sum(r["samples"] for r in mine),
            "patients": len({p for r in mine for p in r["patients"]}),
            **counts,
            "shards": [{k: r[k] for k in ("name", "samples", "sha256", "bytes", "offsets") if k in r} for r in mine],
        }
    return splits


def build_manifest(release, settings, source_sha: str, records: list[dict], errors: list[dict]) -> dict:
    """`release`: the packed DatasetTable; `settings`: the PackSettings."""
    reasons: dict[str, int] = {}
    for e in errors:
        kind = e["reason"].split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "format_version": FORMAT_VERSION,
        "chexdist_version": __version__,
        "dataset": release.name,
        "dataset_options": dict(settings.dataset_options),
        "labels": list(LABELS),
        "label_policy": {**settings.policy.describe(), "known": [label for label in LABELS if label in release.known],
                         "mapping": dict(release.mapping)},
        "patients": release.patients,
        "left_out": dict(release.left_out),
        "image": {
            "size": settings.size,
            "format": settings.format,
            "quality": settings.quality if settings.format == "jpg" else None,
            "mode": "L",
            **({"dicom_window": settings.dataset_options["dicom_window"]} if "dicom_window" in settings.dataset_options else {}),
            "stats": {name: _split_statistics(records, name) for name in SPLITS},
        },
        "split": {
            "method": settings.split,
            "seed": settings.seed,
            "val_fraction": settings.val_fraction if settings.split == "official" else None,
            "fractions": list(settings.fractions) if settings.split == "random" else None,
            "stratify": settings.stratify,
            **({"lists": describe_lists(release.rows, settings.list_files())} if settings.split == "lists" else {}),
        },
        "shard_size": settings.shard_size,
        "limit": settings.limit,
        "source": {"csv": release.main_source, "csv_sha256": source_sha, "rows": int(len(release.rows)),
                   "files": dict(release.sources)},
        "errors": len(errors),
        "error_reasons": reasons,
        "splits": _splits(records),
    }
