"""`chexdist bench reads`: shard bytes read in one epoch by many ranks and workers, from a folder,
`pipe:` streams and HTTP; and the local HTTP server (`serve_folder`) that the tests use too."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from chexdist.data.loader import build_train_loader
from chexdist.data.transforms import build_transform


class SentBytes:
    """Body bytes an HTTP server has written to its sockets, summed over its threads (counted as each
    write starts, so a reader that has finished never finds its bytes missing)."""

    def __init__(self):
        self.total = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


class FolderHandler(BaseHTTPRequestHandler):
    """GET of the files in `folder` (set by :func:`serve_folder`), honouring ``Range: bytes=N-`` and
    ``bytes=N-M`` with 206 and a Content-Range when `ranges`, else answering 200 with the whole file."""

    folder: Path
    ranges: bool
    sent: SentBytes
    _RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")

    def do_GET(self) -> None:
        path = (self.folder / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        wanted = self._RANGE.match(self.headers.get("Range", "")) if self.ranges else None
        if wanted is None:
            self.answer(path, 200, 0, size - 1, size)
            return
        start = int(wanted[1])
        end = min(int(wanted[2]), size - 1) if wanted[2] else size - 1
        if start >= size or end < start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.answer(path, 206, start, end, size)

    def answer(self, path: Path, status: int, start: int, end: int, size: int) -> None:
        """Send bytes start..end of `path` with `status` (206 adds the Content-Range); a client that
        hangs up mid-body ends the answer."""
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end + 1 - start
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                self.sent.add(len(chunk))  # before the write, so a client never sees bytes not yet counted
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.sent.add(-len(chunk))
                    return
                left -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike, ranges: bool = True,
                 handler: type[FolderHandler] = FolderHandler) -> Iterator[tuple[str, SentBytes]]:
    """Serve `folder` over HTTP on 127.0.0.1 (a ThreadingHTTPServer in a thread) for the block:
    yields (base URL, the body bytes sent). ranges=False stands for a server that ignores Range."""
    sent = SentBytes()
    bound = type("Handler", (handler,), {"folder": Path(folder).resolve(), "ranges": ranges, "sent": sent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="chexdist-serve-folder", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", sent
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def reads_suite(ranks: int = 8, workers: int = 8, shards: int = 80, count: int = 1600, batch_size: int = 4,
                **_: Any) -> Iterator[dict[str, Any]]:
    """Shard bytes read in one training epoch by `ranks` x `workers` readers, against the dataset's size.

    Synthetic 32-px images packed into `shards` train shards (the bytes read, not the pixels, are
    measured). Every rank's loader runs in this process one after another, with its real worker
    processes. "local": a shard folder (readers seek to their first sample with the offset index);
    "stream": the same shards through `pipe:cat` (readers read each shard from its start, as with
    object stores); "stream-ranged": through a `pipe:` command with an `{offset}` placeholder
    (`tail -c`, standing in for an object store's byte-range GET), so readers start at their first
    sample's byte; "http": a base URL served by :func:`serve_folder` on 127.0.0.1, whose readers ask
    for their byte range with HTTP Range requests. read_ratio = bytes read / bytes of the train shards
    (1.0 = each byte once); for "http", sent_ratio = body bytes the server sent / the same.
    """
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    transform = build_transform("none", image_size=8, eval_resize=8, train=False)
    with tempfile.TemporaryDirectory(prefix="chexdist-bench-reads-") as tmp:
        make_synthetic_nih(Path(tmp) / "nih", images=count, size=32, seed=0)
        out = Path(tmp) / "shards"
        settings = PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=0, shard_size=max(1, -(-count // shards)))
        manifest = pack_dataset(Path(tmp) / "nih", out, settings, workers=2, progress=False)
        train = manifest["splits"]["train"]
        dataset_bytes = sum(s["bytes"] for s in train["shards"])
        with serve_folder(out) as (base_url, sent):
            sources = (("local", str(out)), ("stream", f"pipe:cat {out}/{{name}}"),
                       ("stream-ranged", f"pipe:tail -c +$(({{offset}} + 1)) {out}/{{name}}"), ("http", base_url))
            for name, where in sources:
                read, sent_before = 0, sent.total
                for rank in range(ranks):
                    with warnings.catch_warnings():  # more workers than cores is the point here
                        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
                        loader, _ = build_train_loader(where, batch_size, transform, workers, ranks, rank, seed=0, epoch=0, manifest=manifest)
                        for _ in loader:
                            pass
                    read += loader.bytes_read
                result = {
                    "bench": "reads",
                    "source": name,
                    "ranks": ranks,
                    "workers": workers,
                    "shards": len(train["shards"]),
                    "images": train["samples"],
                    "dataset_bytes": dataset_bytes,
                    "bytes_read": read,
                    "read_ratio": round(read / dataset_bytes, 3),
                }
                if name == "http":
                    result["bytes_sent"] = sent.total - sent_before
                    result["sent_ratio"] = round(result["bytes_sent"] / dataset_bytes, 3)
                yield result
