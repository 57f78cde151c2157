"""Atomic file writes, strict JSON and checksums: a reader never sees a half-written file under its
final name, and every JSON file chexdist writes parses with a strict parser (no NaN/Infinity)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content into: a temp file in the same folder, synced and
    renamed over `path` when the block ends, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """`fig.savefig` without a half-written image under `path`; the format follows the suffix unless
    given. The figure stays open (the caller closes it)."""
    savefig_kwargs.setdefault("format", Path(path).suffix.lstrip(".").lower() or "png")
    with _atomic_file(path) as f:
        fig.savefig(f, **savefig_kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """obj with every non-finite float (NaN, +-Infinity, numpy ones included) replaced by None.

    Callers record *why* a value is missing next to it (e.g. metrics.jsonl's `val_auc_undefined`);
    this only guarantees the file stays valid JSON for strict readers (jq, JavaScript, Go, Rust).
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy/torch scalar
        return json_safe(obj.item())
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN/Infinity (they become null; see json_safe)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses NaN/Infinity, as strict parsers do (used by the tests and readers)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Any) -> None:
    """Write JSON lines (one record each) atomically."""
    atomic_write_text(path, "".join(dumps_json(record) + "\n" for record in records))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and flush it to disk (metrics and error logs survive a kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps_json(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
