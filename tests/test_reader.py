"""The indexed reader (one positioned read per sample, labels from the shard index) gives exactly what
the tar reader gives: the same batches, labels, order, resume and skip counts, for every layout."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from chexdist.data.loader import build_eval_loader, build_train_loader
from chexdist.data.shardformat import iter_tar, load_manifest
from chexdist.data.shardindex import build_index, index_path, load_index, write_index
from chexdist.labels import LABELS
from tests.test_data import AUGMENT, EVAL, batches_of, png, same_batches, write_shards

LAYOUT = {"train": [7, 3, 12, 1], "val": [5, 0, 4], "test": [1]}
TRAIN_LAYOUTS = [(1, 0, 4, 0), (2, 0, 4, 8), (3, 2, 2, 8), (2, 2, 5, 1000)]  # test_data's (world, workers, batch, buffer)
EVAL_LAYOUTS = [("train", 4, 2, 0), ("train", 5, 3, 2), ("val", 2, 2, 0), ("val", 4, 4, 2), ("test", 3, 2, 0)]


def index_all(root: Path) -> None:
    for shard in sorted(root.glob("*.tar")):
        write_index(shard)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same shards twice: without an index (the tar reader) and with one (the indexed reader)."""
    plain = tmp_path_factory.mktemp("plain")
    write_shards(plain, LAYOUT)
    indexed = tmp_path_factory.mktemp("indexed")
    for path in plain.iterdir():
        shutil.copy2(path, indexed / path.name)
    index_all(indexed)
    return plain, indexed


def train_epoch(root, world_size: int, workers: int, batch: int, buffer: int, transform=EVAL, **kw):
    batches, read, skipped = [], 0, 0
    for rank in range(world_size):
        loader, _ = build_train_loader(root, batch, transform, workers, world_size, rank, seed=5, epoch=1, shuffle_buffer=buffer, **kw)
        batches += batches_of(loader)
        read, skipped = read + loader.bytes_read, skipped + loader.skipped
    return batches, read, skipped


def image_bytes(root: Path) -> int:
    return sum(int(load_index(str(s), len(json.loads(Path(index_path(s)).read_text())["keys"])).size.sum()) for s in root.glob("train-*.tar"))


@pytest.mark.parametrize("world_size,workers,batch,buffer", TRAIN_LAYOUTS)
def test_train_batches_equal_the_tar_readers(pair, world_size, workers, batch, buffer):
    plain, indexed = pair
    ours, read, _ = train_epoch(indexed, world_size, workers, batch, buffer, AUGMENT)
    theirs, tar_read, _ = train_epoch(plain, world_size, workers, batch, buffer, AUGMENT)
    assert same_batches(ours, theirs)
    assert 0 < read < tar_read  # the image bytes only: the index was used
    total = len(ours) * batch
    assert read <= image_bytes(indexed) * (1 + total // sum(LAYOUT["train"]))


@pytest.mark.parametrize("workers,world_size,rank", [(0, 1, 0), (2, 2, 1)])
def test_mid_epoch_resume_equals_the_tar_readers(pair, workers, world_size, rank):
    plain, indexed = pair
    full = batches_of(build_train_loader(plain, 2, AUGMENT, workers, world_size, rank, seed=4, epoch=1, shuffle_buffer=6)[0])
    for k in (1, len(full) // 2, len(full) - 1):
        loader, _ = build_train_loader(indexed, 2, AUGMENT, workers, world_size, rank, seed=4, epoch=1, shuffle_buffer=6, start_batch=k)
        assert same_batches(batches_of(loader), full[k:]), k


def eval_rows(root, split: str, batch: int, world_size: int, workers: int) -> list:
    rows = []
    for rank in range(world_size):
        for b in build_eval_loader(root, split, batch, EVAL, workers, world_size, rank)[0]:
            rows.append((b.images.clone(), b.labels.clone(), b.valid.clone(), b.index.clone(), b.patient_id.clone(), list(b.keys)))
    return rows


@pytest.mark.parametrize("split,batch,world_size,workers", EVAL_LAYOUTS)
def test_eval_batches_equal_the_tar_readers(pair, split, batch, world_size, workers):
    plain, indexed = pair
    ours, theirs = eval_rows(indexed, split, batch, world_size, workers), eval_rows(plain, split, batch, world_size, workers)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert all(torch.equal(x, y) for x, y in zip(a[:5], b[:5])) and a[5] == b[5]


def test_corrupt_samples_are_skipped_alike(tmp_path):
    """An undecodable image, a sample without json, a cut shard (its index no longer matches: the tar
    reader takes over): the same skips, counted exactly, and the same replacement batches."""
    plain, indexed = tmp_path / "plain", tmp_path / "indexed"
    write_shards(plain, {"train": [6, 6, 5], "val": [4, 3]}, bad={1: "image", 8: "json", 18: "image"})
    shutil.copytree(plain, indexed)
    index_all(indexed)
    for root in (plain, indexed):
        with open(root / "train-000002.tar", "r+b") as f:
            f.truncate(1536)
    assert load_index(str(indexed / "train-000001.tar"), 6) is not None
    assert load_index(str(indexed / "train-000002.tar"), 5) is None
    ours, _, skipped = train_epoch(indexed, 2, 0, 4, 8)
    theirs, _, tar_skipped = train_epoch(plain, 2, 0, 4, 8)
    assert same_batches(ours, theirs) and skipped == tar_skipped > 0
    eval_ours, eval_theirs = eval_rows(indexed, "val", 3, 2, 0), eval_rows(plain, "val", 3, 2, 0)
    assert all(all(torch.equal(x, y) for x, y in zip(a[:5], b[:5])) for a, b in zip(eval_ours, eval_theirs))
    loaders = [build_eval_loader(root, "val", 3, EVAL, 0, 1, 0)[0] for root in (indexed, plain)]
    for loader in loaders:
        list(loader)
    assert loaders[0].skipped == loaders[1].skipped == 1


def test_streams_of_indexed_shards_read_the_same(pair):
    """pipe: templates over an indexed folder stream through the tar reader and give the same batches."""
    _, indexed = pair
    local, _, _ = train_epoch(indexed, 3, 2, 2, 8)
    piped, _, _ = train_epoch(f"pipe:cat {indexed}/{{name}}", 3, 2, 2, 8, manifest=load_manifest(indexed))
    assert same_batches(local, piped)


def test_http_shards_read_the_same(pair):
    from chexdist.bench.reads import serve_folder

    _, indexed = pair
    local, _, _ = train_epoch(indexed, 2, 2, 4, 8)
    with serve_folder(indexed) as (base, _):
        served, _, skipped = train_epoch(base, 2, 2, 4, 8, manifest=load_manifest(indexed))
    assert same_batches(local, served) and skipped == 0


def test_index_keeps_unknowns_and_matches_an_independent_parse(tmp_path):
    """Labels with nulls (format v2) become NaN; keys, image bytes and labels match tarfile + json."""
    labels = [[1, None, 0] + [None] * 11, [0] * 14, [None] * 14]
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i, row in enumerate(labels):
            sink.write({"__key__": f"k{i}", "jpg" if i == 1 else "png": png(i), "json": json.dumps({"labels": row, "patient_id": f"p{i}"}).encode()})
    index = build_index(tmp_path / "s.tar")
    expected = {}
    with tarfile.open(tmp_path / "s.tar") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            expected.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert index["keys"] == list(expected) and index["patients"] == ["p0", "p1", "p2"]
    with open(tmp_path / "s.tar", "rb") as f:
        for i, key in enumerate(index["keys"]):
            f.seek(index["start"][i])
            image = expected[key].get("png", expected[key].get("jpg"))
            assert f.read(index["size"][i]) == image
            assert json.loads(expected[key]["json"])["labels"] == index["labels"][i]
    write_index(tmp_path / "s.tar")
    loaded = load_index(str(tmp_path / "s.tar"), 3)
    want = np.array([[np.nan if v is None else v for v in row] for row in labels], dtype=np.float32)
    assert np.array_equal(loaded.labels, want, equal_nan=True) and loaded.labels.shape == (3, len(LABELS))
    assert load_index(str(tmp_path / "s.tar"), 4) is None  # a count that disagrees with the manifest: not used
    assert [s["__key__"] for s in iter_tar(str(tmp_path / "s.tar"))] == index["keys"]


def test_pack_writes_an_index_the_loader_uses(synth_shards):
    manifest = load_manifest(synth_shards)
    for record in manifest["splits"]["train"]["shards"]:
        assert load_index(str(synth_shards / record["name"]), record["samples"], record.get("offsets")) is not None
