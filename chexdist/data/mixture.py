"""Several shard folders as one dataset (`data.shards` as a list), and the epoch's ring of positions.

:func:`load_sources` merges the sources' manifests into one manifest whose shard records carry
their own `url`, `dataset` and `source`, so the loaders, the engine and evaluation read a mixture
as they read one folder: equal batches per rank, exactly-once evaluation (the sources' splits
concatenated in the order given) and exact resume hold unchanged. Patients are namespaced by
dataset (`chexdist.data.shardformat.namespaced_patient`) wherever they are compared or coded.

Without weights an epoch reads every sample of every source once, the shards of all sources
permuted together. With `weights` (one per source) an epoch still has as many samples as the
union, shared out in proportion to the weights (largest remainder): a source takes its share as a
seeded, per-epoch rotated range of its own ring (wrapping, so a share larger than the source
repeats samples, and a smaller one sees a different part each epoch).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from chexdist.data.shardformat import dataset_name, iter_tar, load_manifest, namespaced_patient, resolve, split_shards
from chexdist.data.shardindex import load_index
from chexdist.errors import ChexdistError

Chunk = tuple[int, int, int]  # (shard, skip, take): a run of consecutive samples of one shard


def source_list(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shard locations of `data.shards`: one string, or a list of them."""
    if isinstance(shards, (str, os.PathLike)):
        return [os.fspath(shards)]
    return [os.fspath(s) for s in shards]


def _sum_tables(tables: list[Any]) -> Any:
    """Sum per-label count tables (dicts or lists of ints) of the sources' splits; None where they differ in kind."""
    if all(isinstance(t, dict) for t in tables):
        keys = list(dict.fromkeys(k for t in tables for k in t))
        return {k: _sum_tables([t.get(k, 0) for t in tables]) for k in keys}
    if all(isinstance(t, int) and not isinstance(t, bool) for t in tables):
        return sum(tables)
    return None


def _check_weights(sources: list[str], weights: Sequence[float] | None) -> list[float] | None:
    if not weights:
        return None
    if len(weights) != len(sources):
        raise ChexdistError(f"config key 'data.shard_weights': {len(weights)} weights for {len(sources)} shard folders; give one per folder")
    if any(not w > 0 for w in weights):
        raise ChexdistError(f"config key 'data.shard_weights': weights must be > 0, got {list(weights)}")
    return [float(w) for w in weights]


def load_sources(shards: str | os.PathLike | Sequence[str], weights: Sequence[float] | None = None) -> dict:
    """The manifest of `shards`: one folder's own, or the merged manifest of several (see module doc)."""
    sources = source_list(shards)
    if not sources:
        raise ChexdistError("config key 'data.shards' is empty; pass --shards DIR or --set data.shards=DIR")
    if len(set(sources)) != len(sources):
        twice = next(s for s in sources if sources.count(s) > 1)
        raise ChexdistError(f"data.shards lists {twice} twice; a folder's samples would be read twice an epoch (use data.shard_weights)")
    weights = _check_weights(sources, weights)
    if len(sources) == 1 and weights is None:
        return load_manifest(sources[0])
    manifests = [load_manifest(s) for s in sources]
    splits: dict[str, dict] = {}
    for name in dict.fromkeys(n for m in manifests for n in m["splits"]):
        parts = [(i, m["splits"][name]) for i, m in enumerate(manifests) if name in m["splits"]]
        records = [{**r, "url": resolve(sources[i], r["name"]), "dataset": dataset_name(manifests[i]), "source": i}
                   for i, part in parts for r in split_shards(manifests[i], name, sources[i])]
        merged = {k: _sum_tables([p.get(k, 0) for _, p in parts]) for k in ("samples", "patients", "positives", "unknowns")}
        splits[name] = {**{k: v for k, v in merged.items() if v is not None}, "shards": records}
    described = [{"shards": s, "dataset": dataset_name(m), "format_version": m.get("format_version"), "image": m.get("image"),
                  "weight": weights[i] if weights else None, "samples": {k: v.get("samples") for k, v in m["splits"].items()}}
                 for i, (s, m) in enumerate(zip(sources, manifests))]
    first = manifests[0]
    return {"format_version": first.get("format_version"), "labels": first["labels"], "image": first.get("image", {}),
            "dataset": "+".join(dict.fromkeys(d["dataset"] for d in described)), "mixture": {"sources": described}, "splits": splits,
            "split": {"mixture": [m.get("split") for m in manifests]}, "source": {"mixture": [m.get("source") for m in manifests]}}


# ---------------------------------------------------------------- the epoch ring


def ring_segments(chunks: list[Chunk], start: int, length: int | None) -> Iterator[Chunk]:
    """(shard, skip, take) covering ring positions start .. start+length-1, wrapping; None = forever.

    The ring is the concatenation of `chunks`; position q lies in chunk i where cum[i] <= q < cum[i+1].
    """
    cum = [0]
    for _, _, take in chunks:
        cum.append(cum[-1] + take)
    total = cum[-1]
    q = start % total
    remaining = length
    while remaining is None or remaining > 0:
        i = bisect.bisect_right(cum, q) - 1
        shard, skip, _ = chunks[i]
        take = cum[i + 1] - q
        if remaining is not None:
            take = min(take, remaining)
            remaining -= take
        yield shard, skip + q - cum[i], take
        q = (q + take) % total


def shares(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples per epoch of each source: sum(sizes) shared in proportion to `weights`, largest remainder."""
    total, weight = sum(sizes), sum(weights)
    exact = [total * w / weight for w in weights]
    share = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (share[i] - exact[i], i))[: total - sum(share)]:
        share[i] += 1
    return share


def weighted_chunks(counts: list[int], sources: list[list[int]], share: list[int], rng: np.random.Generator) -> list[Chunk]:
    """One epoch's ring of a weighted mixture: each source's share from a seeded start of its own permuted
    ring, cut at shard boundaries, and all the pieces permuted together."""
    chunks: list[Chunk] = []
    for shards, n in zip(sources, share):
        order = [shards[i] for i in rng.permutation(len(shards))]
        own = [(s, 0, counts[s]) for s in order]
        start = int(rng.integers(sum(counts[s] for s in shards)))
        if n:
            chunks += ring_segments(own, start, n)
    return [chunks[i] for i in rng.permutation(len(chunks))]


# ---------------------------------------------------------------- leakage across folders


def _patients(record: dict) -> set[Any]:
    index = load_index(record["url"], record["samples"], record.get("offsets"))
    if index is not None:
        return set(index.patients)
    import json

    found = set()
    for sample in iter_tar(record["url"]):
        try:
            found.add(json.loads(sample["json"]).get("patient_id"))
        except (KeyError, ValueError, AttributeError):
            continue  # the loader counts this sample as a skip
    return found


def check_union_leakage(manifest: dict) -> None:
    """Refuse a mixture in which one patient (namespaced by dataset) is in two splits of the union.

    Each folder's own splits were checked at pack time and patients of different datasets cannot
    collide, so only folders of the same dataset are read (patients from their shard indexes, or
    from the json of shards without one)."""
    sources = manifest.get("mixture", {}).get("sources", [])
    names = [s["dataset"] for s in sources]
    shared = {i for i, n in enumerate(names) if names.count(n) > 1}
    if not shared:
        return
    seen: dict[str, tuple[str, str]] = {}
    for split, info in manifest["splits"].items():
        for record in info["shards"]:
            if record["source"] not in shared:
                continue
            where = sources[record["source"]]["shards"]
            for patient in _patients(record):
                key = namespaced_patient(record["dataset"], patient)
                other = seen.setdefault(key, (where, split))
                if other[1] != split:
                    raise ChexdistError(
                        f"data.shards: patient {key} is in {other[0]} split {other[1]!r} and in {where} split {split!r}; "
                        "a patient must be in one split of the union: pack these folders with one split assignment, or drop one"
                    )
