"""The shard format, shared by the writer (`chexdist.data.pack`) and the readers (`chexdist.data.loader`,
`chexdist.data.verify`): file names, the manifest, shard locations (folders, URLs, `pipe:` templates)
and reading one tar shard's samples.

A shard is a WebDataset tar `{split}-{NNNNNN}.tar`; each sample is `{key}.png|jpg` (8-bit gray) plus
`{key}.json`. `manifest.json` (written last) holds per-split shard records with sample counts and
sha256, labels in chexdist's order and the format version. See shards/README.md for the full spec.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, check_labels

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 adds the dataset, unknown labels (null) and per-finding negatives/unknowns
MANIFEST = "manifest.json"
IMAGE_KEYS = ("png", "jpg", "jpeg")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def dataset_name(manifest: dict) -> str:
    """The dataset a manifest describes (format version 2 records it); version-1 manifests are NIH."""
    return str(manifest.get("dataset") or "nih")


def namespaced_patient(dataset: str, patient_id: Any) -> str:
    """The patient ID used wherever datasets meet (mixtures, leakage checks, lineage digests), so
    that patient 17 of one dataset can never collide with patient 17 of another."""
    return f"{dataset}:{patient_id}"


def is_remote(source: str | os.PathLike) -> bool:
    """True for a shard location read as a stream (a URL or a `pipe:` command), False for a local path."""
    source = str(source)
    return source.startswith("pipe:") or bool(_URL.match(source))


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
    training process up to its checkpoint, then end by SIGPIPE/EOF (see `chexdist.utils.stopsignals`)."""
    from webdataset import utils
    from webdataset.gopen import Pipe, gopen

    from chexdist.utils.stopsignals import blocked, ignoring_shell

    url = at_offset(url)
    with blocked():
        if url.startswith("pipe:") and not utils.enforce_security:  # gopen's pipe: (shell=True), signals ignored
            return Pipe(ignoring_shell(url[len("pipe:"):]), mode="rb", bufsize=8192, ignore_status=[141])
        return gopen(url, "rb")


_PIPE_EXIT = re.compile(r"^\(\(\[?'?(\S+?)'?[,\s].*: exit (\d+) \(read\)", re.DOTALL)
_CURL_EXITS = {6: "cannot resolve the host", 7: "cannot connect to the host", 22: "HTTP error (e.g. 404: no such file)",
               28: "timed out", 35: "TLS handshake failed", 60: "server certificate not trusted"}


def describe_stream_error(exc: BaseException) -> str:
    """A stream's failure in words: webdataset reports a failed command as the repr of its Popen
    arguments; this names the command and its exit status (curl's explained) instead."""
    found = _PIPE_EXIT.match(str(exc))
    if found is None:
        return str(exc)
    program, status = os.path.basename(found[1]), int(found[2])
    if program == "curl":
        return f"curl exit {status}: {_CURL_EXITS.get(status, 'see man curl, EXIT CODES')}"
    return f"the pipe: command exited with status {status}"


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
        stream = open(where, "rb") if is_local else _open(where)  # noqa: SIM115 (closed below)
        try:
            text = stream.read()
        finally:
            stream.close()
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChexdistError(f"{where}: manifest is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ChexdistError(f"{where}: cannot read the manifest ({describe_stream_error(exc)}); check the URL or command") from exc
    if not isinstance(manifest, dict):
        raise ChexdistError(f"{where}: manifest must be a JSON object")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ChexdistError(
            f"{where}: shard format_version {manifest.get('format_version')!r} is not one of "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-pack with this chexdist"
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


def label_counts(metas: Iterable[dict]) -> dict[str, list[int]]:
    """Positives, negatives and unknowns (null) per label, chexdist's order, of samples' metadata:
    a shard record's and (summed) a split's counts."""
    counts = np.zeros((3, len(LABELS)), dtype=np.int64)
    for meta in metas:
        values = np.asarray([np.nan if v is None else v for v in meta["labels"]], dtype=float)
        counts[0] += values == 1
        counts[1] += values == 0
        counts[2] += np.isnan(values)
    return {"positives": counts[0].tolist(), "negatives": counts[1].tolist(), "unknowns": counts[2].tolist()}


def positives(metas: Iterable[dict]) -> list[int]:
    """Positives per label (chexdist's order) of samples' metadata."""
    return label_counts(metas)["positives"]


def split_label_counts(info: dict) -> dict[str, dict[str, int]]:
    """A manifest split's positives, negatives and unknowns per label; a version-1 split (every label
    known) has only positives, so its negatives are the other samples and it has no unknowns."""
    pos = info["positives"]
    if "negatives" in info and "unknowns" in info:
        return {"positives": pos, "negatives": info["negatives"], "unknowns": info["unknowns"]}
    n = info["samples"]
    return {"positives": pos, "negatives": {k: n - v for k, v in pos.items()}, "unknowns": dict.fromkeys(pos, 0)}


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


_HTTP = re.compile(r"^https?://", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
HTTP_TIMEOUT_S = 60
HTTP_RETRIES = 5  # like curl's --retry: a dropped connection, a timeout or a 408/429/5xx answer
HTTP_RETRY_DELAY_S = 2.0
_TRANSIENT = {408, 429, 500, 502, 503, 504}
_ignores_ranges: set[str] = set()


def _open_http(url: str, start: int, end: int | None, on_read: Callable[[int], None] | None = None):
    """An http(s) shard as a stream of its bytes `start`..`end` (inclusive; None: to its end).

    From byte 0, a `pipe:` curl through :func:`_open` with webdataset's curl options (its retries
    kept) and ``-r 0-end``.
    Otherwise a ``Range: bytes=start-end`` GET through urllib (the environment's proxies, redirects
    followed with the Range kept, a socket timeout of `HTTP_TIMEOUT_S`, transient failures retried
    `HTTP_RETRIES` times as curl's ``--retry`` does): a 206 whose Content-Range
    matches is used as is; a 200 (the server ignores Range) is read from byte 0 with the prefix
    discarded through `on_read`, so it counts as read, and one warning per host and process; any
    other answer raises ChexdistError naming the URL, so the reader counts its samples as skipped.
    """
    if start == 0:
        import shlex

        return _open(f"pipe:curl --connect-timeout 30 --retry 30 --retry-delay 2 -f -s -L -r 0-{end} {shlex.quote(url)}")
    import logging
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    asked = f"bytes={start}-{'' if end is None else end}"
    for attempt in range(HTTP_RETRIES + 1):
        last = attempt == HTTP_RETRIES
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": asked}), timeout=HTTP_TIMEOUT_S)
            break
        except urllib.error.HTTPError as exc:
            exc.close()
            if last or exc.code not in _TRANSIENT:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise ChexdistError(f"{url}: HTTP {exc.code} {exc.reason} to 'Range: {asked}'{tries} (expected 206 Partial Content)") from None
        except OSError as exc:
            if last:
                raise ChexdistError(f"{url}: cannot open for 'Range: {asked}' after {attempt + 1} tries ({exc})") from exc
        time.sleep(HTTP_RETRY_DELAY_S * (attempt + 1))
    try:
        if response.status == 206:
            answered = response.headers.get("Content-Range", "")
            found = _CONTENT_RANGE.match(answered.strip())
            if found is None or int(found[1]) != start or (end is not None and int(found[2]) != end):
                raise ChexdistError(f"{url}: asked for 'Range: {asked}', got Content-Range {answered!r}")
            return response
        if response.status != 200:
            raise ChexdistError(f"{url}: HTTP {response.status} to 'Range: {asked}' (expected 206 Partial Content or 200)")
        host = urlsplit(url).netloc
        if host not in _ignores_ranges:
            _ignores_ranges.add(host)
            logging.getLogger(__name__).warning("%s ignores HTTP Range requests (200 instead of 206): its shards are read from byte 0 "
                        "and the prefix before each reader's first sample discarded, so reads are not reduced", host)
        left = start
        while left > 0:
            chunk = response.read(min(left, 1 << 20))
            if not chunk:
                raise ChexdistError(f"{url}: ended after {start - left} bytes, before byte {start} where the reader starts")
            left -= len(chunk)
            if on_read is not None:
                on_read(len(chunk))
        return response
    except BaseException:
        response.close()
        raise


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
    which is set to that header's byte offset (0 without offsets); and a plain http(s) URL asks for
    just the bytes of samples skip .. skip+take-1 with an HTTP Range request (:func:`_open_http`: from
    byte 0 through curl, else urllib, the answer checked; a server that ignores Range costs the prefix,
    counted in `on_read`, and a bad answer raises). A whole http shard, and any other stream
    (pipe: without `{offset}`, or without offsets), is read from byte 0 through the skipped samples.
    Reading stops once `take` samples are out; `on_read(n)` sees every chunk read.
    A corrupt first header or a cut inside a member raises tarfile.ReadError, but tarfile takes a
    corrupt later header, or a cut between members, for the end of the archive: the shard just ends
    early, so callers check the count against the manifest (as the loader's segment reader does).
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    path = local_path(url)
    http = path is None and OFFSET not in url and _HTTP.match(url) is not None
    start, end = 0, None
    if offsets is not None and (path is not None or OFFSET in url or http):
        if http and take is not None and skip + take < len(offsets):
            end = offsets[skip + take] - 1
        if 0 < skip < len(offsets):
            start, skip = offsets[skip], 0
    if path is not None:
        stream = open(path, "rb")  # noqa: SIM115 (closed in the finally below)
    elif http and (start or end is not None):
        stream = _open_http(url, start, end, on_read)
    else:
        stream = _open(at_offset(url, start))
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
