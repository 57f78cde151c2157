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
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

from chexdist.errors import ChexdistError
from chexdist.labels import check_labels

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_KEYS = ("png", "jpg", "jpeg")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


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


OFFSET = "{offset}"


def at_offset(url: str, start: int = 0) -> str:
    """`url` with its `{offset}` placeholder (a byte-range stream, see :func:`iter_tar`) set to `start`."""
    return url.replace(OFFSET, str(start))


def _open(url: str):
    """A gopen stream whose process, if any (a pipe: command, curl), ignores the stop signals: they
    reach it too (SLURM signals the whole step, Ctrl-C the foreground group), and it must serve the
    training process up to its checkpoint, then end by SIGPIPE/EOF (see `chexdist.stopsignals`)."""
    from webdataset import utils
    from webdataset.gopen import Pipe, gopen

    from chexdist.stopsignals import blocked, ignoring_shell

    url = at_offset(url)
    with blocked():
        if url.startswith("pipe:") and not utils.enforce_security:  # gopen's pipe: (shell=True), signals ignored
            return Pipe(ignoring_shell(url[len("pipe:"):]), mode="rb", bufsize=8192, ignore_status=[141])
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


def local_path(url: str) -> str | None:
    """The file path of a shard URL that names a local file (a path or file://), else None (a stream)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("pipe:") or _URL.match(url):
        return None
    return url


def sample_offsets(path: str | os.PathLike) -> list[int]:
    """Byte offset of each sample's first tar header in a local shard, numbered as :func:`iter_tar` numbers them.

    The one definition of the offset index: pack stores it in the manifest (`offsets` per shard) and the
    loader rebuilds it for manifests without one. tarfile's random-access mode seeks over member data, so
    only the 512-byte headers are read.
    """
    import tarfile

    from webdataset.tariterators import base_plus_ext

    offsets, last = [], None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            key, _ = base_plus_ext(name)
            if key is not None and key != last:
                offsets.append(member.offset)
                last = key
    return offsets


class _Counted:
    """A read-only stream that reports the bytes it hands out (bytes read per epoch, see the loader bench)."""

    def __init__(self, raw, on_read: Callable[[int], None]):
        self.raw, self.on_read = raw, on_read

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.on_read(len(data))
        return data

    def close(self) -> None:
        self.raw.close()


def iter_tar(
    url: str,
    skip: int = 0,
    take: int | None = None,
    *,
    offsets: Sequence[int] | None = None,
    on_read: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples number skip .. skip+take-1 of one shard, as {"__key__", "__url__", ext: bytes}.

    webdataset's tar_file_iterator + group_by_keys over a gopen stream (tarfile in stream mode, so
    files and pipes alike). With `offsets` (:func:`sample_offsets`) a local shard is opened at sample
    `skip`'s header, so nothing before it is read; so is a stream whose URL holds an `{offset}`
    placeholder (a command that starts at that byte, e.g. ``pipe:curl -s -r {offset}- https://h/{name}``),
    which is set to that header's byte offset (0 without offsets). Any other stream (pipe:, http)
    reads through the skipped samples. Reading stops once `take` samples are out; `on_read(n)` sees every chunk read.
    A corrupt first header or a cut inside a member raises tarfile.ReadError, but tarfile takes a
    corrupt later header, or a cut between members, for the end of the archive: the shard just ends
    early, so callers check the count against the manifest (`data._read_segments`).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    path = local_path(url)
    start = 0
    if (path is not None or OFFSET in url) and offsets is not None and 0 < skip < len(offsets):
        start, skip = offsets[skip], 0
    stream = open(path, "rb") if path is not None else _open(at_offset(url, start))
    finished = False
    try:
        if start and path is not None:
            stream.seek(start)
        source = _Counted(stream, on_read) if on_read is not None else stream
        samples = group_by_keys({**f, "__url__": url} for f in tar_file_iterator(source))
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
