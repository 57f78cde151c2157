"""http(s) shards from a real local HTTP server (`chexdist.bench.reads.serve_folder`): readers that start
mid-shard ask for their byte range, a server that ignores Range costs bytes but not batches, and a
bad answer to a range request loses only its samples, counted and explained."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import pytest
import torch

import chexdist.data.shardformat
from chexdist.bench.reads import FolderHandler, serve_folder
from chexdist.data.loader import build_train_loader
from chexdist.data.shardformat import load_manifest
from chexdist.data.transforms import build_transform

EVAL = build_transform("none", image_size=8, eval_resize=8, train=False)
RANKS, BATCH = 2, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    """120 synthetic 32-px images in 12 train shards of 10, packed with their sample offsets."""
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("http-shards")
    make_synthetic_nih(root / "nih", images=120, size=32, seed=0)
    settings = PackSettings(split="random", fractions=(1.0, 0.0, 0.0), size=0, shard_size=10)
    pack_dataset(root / "nih", root / "shards", settings, workers=1, progress=False)
    return root / "shards", load_manifest(root / "shards")


def epoch(where, manifest: dict, workers: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int, int]:
    """One epoch of every rank's train loader: (batches, bytes read, samples skipped, batches promised)."""
    batches, read, skipped, promised = [], 0, 0, 0
    for rank in range(RANKS):
        loader, n = build_train_loader(where, BATCH, EVAL, workers, RANKS, rank, seed=0, epoch=0, manifest=manifest)
        batches += [(x.clone(), y.clone()) for x, y in loader]
        read, skipped, promised = read + loader.bytes_read, skipped + loader.skipped, promised + n
    return batches, read, skipped, promised


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def dataset_bytes(manifest: dict) -> int:
    return sum(record["bytes"] for record in manifest["splits"]["train"]["shards"])


class Recording(FolderHandler):
    """Records each request's file name and Range header (None without one) in `requests`."""

    requests: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.requests.append((Path(self.path).name, self.headers.get("Range")))
        super().do_GET()


class Moved(Recording):
    """Also redirects /moved/NAME to /NAME (302), as object stores and CDNs do."""

    def do_GET(self) -> None:
        if self.path.startswith("/moved/"):
            self.requests.append(("moved", self.headers.get("Range")))
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


def recording(requests: list) -> type[FolderHandler]:
    return type("Recorder", (Moved,), {"requests": requests})


def range_start(header: str | None) -> int:
    return int(header.removeprefix("bytes=").split("-")[0]) if header else 0


@pytest.mark.slow
def test_http_readers_ask_for_their_byte_range(shards):
    """2 ranks x 2 workers over http://127.0.0.1: the folder's batches, and the server sends each byte
    of the epoch once (here exactly the shards' size; reading every prefix again cost 1.33x)."""
    folder, manifest = shards
    local, local_read, _, promised = epoch(folder, manifest, workers=2)
    requests: list = []
    with serve_folder(folder, handler=recording(requests)) as (url, sent):
        http, http_read, skipped, _ = epoch(url, manifest, workers=2)
    assert len(local) == promised == 30 and same_batches(http, local) and skipped == 0
    assert sent.total <= 1.01 * dataset_bytes(manifest)
    assert 0 < local_read < http_read <= 1.01 * dataset_bytes(manifest)  # local shards are indexed: image bytes only
    assert any(range_start(header) > 0 for _, header in requests), "no reader started mid-shard"


def test_server_that_ignores_ranges_costs_bytes_not_batches(shards, caplog):
    """A server answering 200 to every Range request: the same batches, each discarded prefix counted
    in bytes read, and one warning in this process naming the host."""
    folder, manifest = shards
    local, *_ = epoch(folder, manifest, workers=0)
    with serve_folder(folder) as (url, _):
        ranged, ranged_read, _, _ = epoch(url, manifest, workers=0)
    requests: list = []
    with caplog.at_level(logging.WARNING, logger="chexdist.data.shardformat"), \
            serve_folder(folder, ranges=False, handler=recording(requests)) as (url, sent):
        ignored, ignored_read, skipped, _ = epoch(url, manifest, workers=0)
    assert same_batches(ignored, local) and same_batches(ranged, local) and skipped == 0
    prefixes = [range_start(header) for _, header in requests if range_start(header) > 0]
    assert len(prefixes) >= 2
    assert ignored_read >= ranged_read + sum(prefixes)
    assert sent.total >= ignored_read
    host = url.split("/")[2]
    warned = [r.getMessage() for r in caplog.records if "ignores HTTP Range requests" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(host), warned


class Faulty(FolderHandler):
    """Answers every range request past byte 0 with `fault`, recording (file, first byte, last byte)."""

    fault: str
    faulted: list[tuple[str, int, int | None]]

    def do_GET(self) -> None:
        wanted = self._RANGE.match(self.headers.get("Range", ""))
        if wanted is None or int(wanted[1]) == 0:
            super().do_GET()
            return
        path = self.folder / Path(self.path).name
        size, start = path.stat().st_size, int(wanted[1])
        end = int(wanted[2]) if wanted[2] else None
        self.faulted.append((path.name, start, end))
        if self.fault == "500":
            self.send_error(500)
        elif self.fault == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.answer(path, 206, start + 512, size - 1 if end is None else end, size)


@pytest.mark.parametrize("fault, reason", [("500", "HTTP 500"), ("416", "HTTP 416"), ("content-range", "got Content-Range")])
def test_bad_range_answers_are_counted_skips(shards, caplog, monkeypatch, fault, reason):
    """Each failed range request loses exactly the samples it asked for: counted as skipped, logged
    with the reason, replaced, so every rank still gets its full number of batches."""
    folder, manifest = shards
    monkeypatch.setattr(chexdist.data.shardformat, "HTTP_RETRY_DELAY_S", 0.0)
    offsets = {r["name"]: r["offsets"] for r in manifest["splits"]["train"]["shards"]}
    requests: list = []
    handler = type("Fault", (Faulty,), {"fault": fault, "faulted": requests})
    with caplog.at_level(logging.WARNING, logger="chexdist.data.loader"), serve_folder(folder, handler=handler) as (url, _):
        batches, _, skipped, promised = epoch(url, manifest, workers=0)
    assert len(batches) == promised == 30
    faulted = list(dict.fromkeys(requests))
    tries = chexdist.data.shardformat.HTTP_RETRIES + 1 if fault == "500" else 1  # only the transient answer is retried
    assert all(requests.count(r) == tries for r in faulted), requests
    asked = [(len(offsets[name]) if end is None else bisect.bisect_right(offsets[name], end)) - offsets[name].index(start)
             for name, start, end in faulted]
    assert faulted and skipped == sum(asked) > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(lines) == len(faulted) and all(reason in line for line in lines), lines


def test_iter_tar_asks_for_exactly_the_samples_it_reads(shards):
    """iter_tar over http with the offset index: a read from mid-shard sends 'bytes=N-M' (urllib), a
    read from sample 0 that stops early 'bytes=0-M' (curl), a whole shard no Range; the samples are the
    folder's and the server sends exactly the bytes asked for. A redirect keeps the Range."""
    from chexdist.data.shardformat import iter_tar

    folder, manifest = shards
    record = manifest["splits"]["train"]["shards"][3]
    offsets, name = record["offsets"], record["name"]
    requests: list = []
    with serve_folder(folder, handler=recording(requests)) as (url, sent):
        for skip, take, header, size in ((4, 3, f"bytes={offsets[4]}-{offsets[7] - 1}", offsets[7] - offsets[4]),
                                         (0, 2, f"bytes=0-{offsets[2] - 1}", offsets[2]),
                                         (0, None, None, record["bytes"])):
            before = sent.total
            keys = [s["__key__"] for s in iter_tar(url + name, skip, take, offsets=offsets)]
            assert keys == [s["__key__"] for s in iter_tar(str(folder / name), skip, take)]
            assert len(keys) == (take or record["samples"]) and requests[-1] == (name, header)
            assert sent.total - before == size
        requests.clear()
        keys = [s["__key__"] for s in iter_tar(f"{url}moved/{name}", 4, 3, offsets=offsets)]
        assert keys == [s["__key__"] for s in iter_tar(str(folder / name), 4, 3)]
        assert requests == [("moved", f"bytes={offsets[4]}-{offsets[7] - 1}"), (name, f"bytes={offsets[4]}-{offsets[7] - 1}")]


class Flaky(FolderHandler):
    """Answers the first request for each range past byte 0 with 503, then serves it."""

    seen: set

    def do_GET(self) -> None:
        wanted = self.headers.get("Range", "")
        if wanted and not wanted.startswith("bytes=0-") and (self.path, wanted) not in self.seen:
            self.seen.add((self.path, wanted))
            self.send_error(503)
            return
        super().do_GET()


def test_transient_http_errors_are_retried(shards, monkeypatch):
    """A 503 (an object store's "slow down") is retried, as curl's --retry does: nothing is lost."""
    folder, manifest = shards
    monkeypatch.setattr(chexdist.data.shardformat, "HTTP_RETRY_DELAY_S", 0.0)
    local, *_ = epoch(folder, manifest, workers=0)
    seen: set = set()
    with serve_folder(folder, handler=type("Flaky503", (Flaky,), {"seen": seen})) as (url, _):
        batches, _, skipped, _ = epoch(url, manifest, workers=0)
    assert seen and skipped == 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, local, strict=True))
