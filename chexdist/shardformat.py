"""The shard format, shared by the writer (`pack`) and the reader (`data`): file names, the manifest,
shard locations (folders, URLs, `pipe:` templates) and reading one tar shard's samples.

A shard is a WebDataset tar `{split}-{NNNNNN}.tar`; each sample is `{key}.png|jpg` (8-bit gray) plus
`{key}.json`. `manifest.json` (written last) holds per-split shard records with sample counts and
sha256, labels in chexdist's order and the format version. See shards/README.md for the full spec.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from itertools import islice
from typing import Any

from chexdist.errors import ChexdistError
from chexdist.labels import check_labels

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_KEYS = ("png", "jpg", "jpeg")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def resolve(shard_dir: str | os.PathLike, name: str) -> str:
    """URL or path of file `name` (a shard or the manifest) under `shard_dir` (see module doc)."""
    source = os.fspath(shard_dir)
    if "{name}" in source:
        return source.replace("{name}", name)
    if _URL.match(source):
        return source.rstrip("/") + "/" + name
    if source.startswith("pipe:"):
        raise ChexdistError(f"{source}: a pipe: shard location needs a {{name}} placeholder for the shard file name")
    return os.path.join(source, name)


def _open(url: str):
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def load_manifest(shard_dir: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> dict:
    """Read and check `manifest.json` (format version, label names and order, splits).

    `manifest_path` reads a local copy instead, e.g. when the shards sit in an object store.
    """
    where = os.fspath(manifest_path) if manifest_path is not None else resolve(shard_dir, MANIFEST)
    is_local = not where.startswith("pipe:") and not _URL.match(where)
    if is_local and not os.path.isfile(where):
        raise ChexdistError(
            f"{where}: no manifest; pack the data first (chexdist pack) or point data.shards at a packed dataset"
        )
    try:
        stream = open(where, "rb") if is_local else _open(where)
        try:
            text = stream.read()
        finally:
            stream.close()
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChexdistError(f"{where}: manifest is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ChexdistError(f"{where}: cannot read the manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ChexdistError(f"{where}: manifest must be a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ChexdistError(
            f"{where}: shard format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; re-pack with this chexdist"
        )
    check_labels(manifest.get("labels", []), source=where)
    if not isinstance(manifest.get("splits"), dict):
        raise ChexdistError(f"{where}: manifest has no 'splits' table")
    return manifest


def split_shards(manifest: dict, split: str, where: str = "manifest") -> list[dict]:
    """The shard records of `split`, checked: each has a name and a non-negative sample count."""
    splits = manifest["splits"]
    if split not in splits:
        raise ChexdistError(f"{where}: no split {split!r}; the manifest has {', '.join(sorted(splits)) or 'none'}")
    shards = splits[split].get("shards", [])
    for entry in shards:
        if not isinstance(entry.get("name"), str) or not isinstance(entry.get("samples"), int) or entry["samples"] < 0:
            raise ChexdistError(f"{where}: split {split!r} has a bad shard record {entry!r}")
    return shards



def shard_urls(shard_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> list[str]:
    """URLs (or local paths) of the shards of `split`, in manifest order."""
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    return [resolve(shard_dir, entry["name"]) for entry in split_shards(manifest, split, os.fspath(shard_dir))]


def iter_tar(url: str, skip: int = 0, take: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples number skip .. skip+take-1 of one shard, as {"__key__", "__url__", ext: bytes}.

    webdataset's tar_file_iterator + group_by_keys over a gopen stream (tarfile in stream mode, so
    files and pipes alike); skipped samples are read through (a select_files filter that avoids
    extracting them saved only 4%), and reading stops once `take` samples are out. A corrupt first header or a cut inside a
    member raises tarfile.ReadError, but tarfile takes a corrupt later header, or a cut between
    members, for the end of the archive: the shard just ends early, so callers check the count
    against the manifest (:func:`_read_segments`).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = _open(url)
    finished = False
    try:
        samples = group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream))
        got = 0
        for sample in islice(samples, skip, None if take is None else skip + take):
            got += 1
            yield sample
        finished = take is None or got < take
    finally:
        try:
            stream.close()
        except Exception:
            if finished:
                raise
