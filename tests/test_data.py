"""Streaming loaders on real tar shards: equal batches per rank, exact-once eval, exact resume, counted skips."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from chexdist.data.loader import build_eval_loader, build_train_loader
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.data.shardformat import iter_tar, load_manifest, resolve, shard_urls
from chexdist.data.transforms import build_transform

EVAL = build_transform("none", image_size=8, eval_resize=10, train=False)

AUGMENT = build_transform("strong", image_size=8, eval_resize=10, train=True)


def identity_labels(number: int) -> list[int]:
    """Sample number as 14 bits, so a train batch's labels tell which samples it holds."""
    return [(number >> bit) & 1 for bit in range(len(LABELS))]


def numbers_of(labels: torch.Tensor) -> list[int]:
    weights = torch.tensor([1 << bit for bit in range(len(LABELS))], dtype=torch.float64)
    return (labels.double() @ weights).long().tolist()


def png(seed: int, h: int = 20, w: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(root: Path, layout: dict[str, list[int]], bad: dict[int, str] | None = None) -> dict[str, list[str]]:
    """Shards in the chexdist format; sample n of the whole set has labels identity_labels(n).

    `bad` maps a sample number to 'image' (undecodable bytes) or 'json' (no json part).
    Returns split -> keys in manifest order.
    """
    bad = bad or {}
    root.mkdir(parents=True, exist_ok=True)
    number, keys, splits = 0, {}, {}
    for split, sizes in layout.items():
        keys[split], shards = [], []
        for index, size in enumerate(sizes):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(size):
                    key = f"{number + 1:08d}_000"
                    meta = {
                        "image": f"{key}.png", "labels": identity_labels(number), "patient_id": number + 1,
                        "follow_up": 0, "age": 50, "sex": "F", "view": "PA", "orig_size": [24, 20],
                        "pixel_spacing": [0.14, 0.14], "split": split,
                    }
                    sample = {"__key__": key, "png": b"not a png" if bad.get(number) == "image" else png(number)}
                    if bad.get(number) != "json":
                        sample["json"] = json.dumps(meta).encode()
                    sink.write(sample)
                    keys[split].append(key)
                    number += 1
            shards.append({"name": name, "samples": size, "sha256": "-", "bytes": (root / name).stat().st_size})
        splits[split] = {"samples": sum(sizes), "patients": sum(sizes), "positives": {}, "shards": shards}
    manifest = {
        "format_version": 1, "chexdist_version": "test", "labels": list(LABELS),
        "image": {"size": 20, "format": "png", "quality": None}, "split": {"method": "random", "seed": 0},
        "shard_size": 12, "errors": 0, "source": {}, "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """Odd totals, unequal shards, an empty shard, fewer shards than ranks x workers."""
    root = tmp_path_factory.mktemp("uneven")
    return root, write_shards(root, {"train": [7, 3, 12, 1], "val": [5, 0, 4], "test": [1]})


def collect_train(loader) -> tuple[list[torch.Tensor], list[int]]:
    images, numbers = [], []
    for x, y in loader:
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and y.shape[1] == len(LABELS)
        images.append(x)
        numbers += numbers_of(y)
    return images, numbers


# ---------------------------------------------------------------- manifest and locations


def test_unreachable_manifest_is_one_readable_line(tmp_path):
    """A URL or command that cannot deliver the manifest names the failure, not a Popen repr."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChexdistError) as refused:
        load_manifest(f"http://127.0.0.1:{port}/nih")
    assert str(refused.value) == (f"http://127.0.0.1:{port}/nih/manifest.json: cannot read the manifest "
                                  "(curl exit 7: cannot connect to the host); check the URL or command")
    with pytest.raises(ChexdistError) as failed:
        load_manifest(f"pipe:cat {tmp_path}/{{name}}")
    assert str(failed.value) == (f"pipe:cat {tmp_path}/manifest.json: cannot read the manifest "
                                 "(the pipe: command exited with status 1); check the URL or command")


def test_manifest_missing_label_order_and_split(tmp_path, uneven):
    with pytest.raises(ChexdistError, match="no manifest"):
        load_manifest(tmp_path)
    manifest = json.loads((uneven[0] / "manifest.json").read_text())
    manifest["labels"] = list(reversed(LABELS))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChexdistError, match="label order"):
        load_manifest(tmp_path)
    manifest["labels"], manifest["format_version"] = list(LABELS), 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChexdistError, match="format_version"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ChexdistError, match="not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(ChexdistError, match="no split 'holdout'"):
        shard_urls(uneven[0], "holdout")
    with pytest.raises(ChexdistError, match="no split 'holdout'"):
        build_eval_loader(uneven[0], "holdout", 4, EVAL, 0, 1, 0)


def test_locations():
    assert resolve("shards/nih", "train-000000.tar") == "shards/nih/train-000000.tar"
    assert resolve("pipe:aws s3 cp s3://b/nih/{name} -", "val-000001.tar") == "pipe:aws s3 cp s3://b/nih/val-000001.tar -"
    assert resolve("https://host/nih/", "manifest.json") == "https://host/nih/manifest.json"
    with pytest.raises(ChexdistError, match="placeholder"):
        resolve("pipe:cat shards/nih", "manifest.json")


def test_pipe_template_streams_like_a_directory(uneven):
    root, keys = uneven
    template = f"pipe:cat {root}/{{name}}"
    assert shard_urls(template, "val") == [f"pipe:cat {root}/val-00000{i}.tar" for i in range(3)]
    found = []
    for rank in range(2):
        loader, n = build_eval_loader(template, "val", 2, EVAL, 0, 2, rank)
        found += [k for b in loader for k, v in zip(b.keys, b.valid) if v]
        assert n == 3
    assert found == keys["val"]
    assert [s["__key__"] for s in iter_tar(f"pipe:cat {root}/train-000002.tar", 10, 1)] == keys["train"][20:21]


def test_iter_tar_skip_take(uneven):
    root, keys = uneven
    url = str(root / "train-000002.tar")
    assert [s["__key__"] for s in iter_tar(url, 4, 5)] == keys["train"][10 + 4 : 10 + 9]
    assert [s["__key__"] for s in iter_tar(url, 9)] == keys["train"][19:22]
    assert all({"json", "png"} <= set(s) for s in iter_tar(url))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_iter_tar_reads_long_names_and_skips_other_members(tmp_path, fmt):
    deep = "d" * 90 + "/" + "e" * 60
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for key, ext, data in [("a", "json", b"{}"), ("a", "png", b"x" * 700), (f"{deep}/b", "json", b"[1]"), (f"{deep}/b", "jpg", b"")]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(iter_tar(str(path)))
    assert [s["__key__"] for s in samples] == ["a", f"{deep}/b"]
    assert samples[0]["png"] == b"x" * 700 and samples[1]["json"] == b"[1]" and samples[1]["jpg"] == b""
    assert [s["__key__"] for s in iter_tar(str(path), 1)] == [f"{deep}/b"]


def test_iter_tar_raises_on_bad_start_or_cut_member_and_ends_at_a_later_bad_header(tmp_path, uneven):
    """tarfile (under webdataset's iterator) takes a corrupt later header for the end of the archive."""
    root, keys = uneven
    source = (root / "val-000000.tar").read_bytes()
    with tarfile.open(root / "val-000000.tar") as tar:
        third_sample = [m.offset for m in tar][4]
    for name, data, first_byte in [("bad.tar", source, 0), ("late.tar", source, third_sample), ("cut.tar", source[:1536], None)]:
        data = bytearray(data)
        if first_byte is not None:
            data[first_byte] ^= 0xFF
        (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar(str(tmp_path / "bad.tar")))
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(iter_tar(str(tmp_path / "cut.tar")))
    assert [s["__key__"] for s in iter_tar(str(tmp_path / "late.tar"))] == keys["val"][:2]


# ---------------------------------------------------------------- train


@pytest.mark.parametrize("world_size,num_workers,batch_size,shuffle_buffer", [(1, 0, 4, 0), (2, 0, 4, 8), (3, 2, 2, 8), (2, 2, 5, 1000)])
def test_train_equal_batches_and_full_coverage(uneven, world_size, num_workers, batch_size, shuffle_buffer):
    root, keys = uneven
    total = len(keys["train"])
    expected = -(-total // (batch_size * world_size))
    seen = []
    for rank in range(world_size):
        loader, n = build_train_loader(root, batch_size, EVAL, num_workers, world_size, rank, seed=3, epoch=0, shuffle_buffer=shuffle_buffer)
        images, numbers = collect_train(loader)
        assert n == expected == len(loader) == len(images)
        assert all(len(x) == batch_size for x in images)
        seen += numbers
    assert set(seen) == set(range(total))
    assert len(seen) == expected * batch_size * world_size
    assert len(seen) - len(set(seen)) < batch_size * world_size


def test_train_shuffles_and_differs_by_epoch(uneven):
    root, _ = uneven
    orders = [collect_train(build_train_loader(root, 4, EVAL, 0, 1, 0, seed=0, epoch=e)[0])[1] for e in (0, 1)]
    assert orders[0] != orders[1]
    assert orders[0] != sorted(orders[0])


def test_train_exact_resume_and_rng_isolation(uneven):
    """Epoch 2 rebuilt after a 'restart' equals epoch 2 of an uninterrupted run, augmentation included."""
    root, _ = uneven
    torch.manual_seed(123)
    uninterrupted = []
    for epoch in range(3):
        state = torch.get_rng_state()
        loader, _ = build_train_loader(root, 4, AUGMENT, 0, 2, 1, seed=7, epoch=epoch, shuffle_buffer=5)
        uninterrupted.append(collect_train(loader))
        assert torch.equal(state, torch.get_rng_state()), "the loader must not consume the global torch RNG"
        torch.randn(1000)
    torch.manual_seed(999)
    resumed = collect_train(build_train_loader(root, 4, AUGMENT, 0, 2, 1, seed=7, epoch=2, shuffle_buffer=5)[0])
    assert resumed[1] == uninterrupted[2][1]
    assert all(torch.equal(a, b) for a, b in zip(resumed[0], uninterrupted[2][0]))
    assert not torch.equal(uninterrupted[1][0][0], uninterrupted[2][0][0])


def test_train_workers_deterministic_and_single_threaded(uneven):
    root, _ = uneven
    runs = [collect_train(build_train_loader(root, 3, AUGMENT, 2, 1, 0, seed=1, epoch=4)[0]) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    threads = build_transform("none", image_size=8, eval_resize=10, train=False)
    threads.transforms.append(ThreadCount())
    loader, _ = build_train_loader(root, 4, threads, 2, 1, 0, seed=0, epoch=0)
    assert {float(x.max()) for x, _ in loader} == {1.0}


class ThreadCount(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image, float(torch.get_num_threads()))


def test_train_spawn_matches_fork(uneven):
    root, _ = uneven
    args = (root, 4, AUGMENT, 1, 2, 0)
    forked = collect_train(build_train_loader(*args, seed=5, epoch=1, multiprocessing_context="fork")[0])
    spawned = collect_train(build_train_loader(*args, seed=5, epoch=1, multiprocessing_context="spawn")[0])
    assert forked[1] == spawned[1]
    assert all(torch.equal(a, b) for a, b in zip(forked[0], spawned[0]))


def test_train_dataset_pickles(uneven):
    loader, _ = build_train_loader(uneven[0], 4, AUGMENT, 0, 1, 0, seed=0, epoch=0)
    clone = pickle.loads(pickle.dumps(loader.loader.dataset))
    assert numbers_of(next(iter(clone))[1]) == collect_train(loader)[1][:4]


def test_train_max_batches(uneven):
    loader, n = build_train_loader(uneven[0], 2, EVAL, 0, 2, 1, seed=0, epoch=0, max_batches=2)
    assert n == 2 and len(collect_train(loader)[0]) == 2


def test_train_skips_are_counted_and_replaced(tmp_path, caplog):
    """Exact counts: every failed read is one skip, also a re-read of a bad sample by a replacement's scan
    (rank 1's ring passes the cut shard three times and sample 1 twice more); each loader's count equals
    the losses its warnings name (one per sample, or N for "N sample(s) of" a cut shard)."""
    write_shards(tmp_path, {"train": [6, 6, 5]}, bad={1: "image", 8: "json"})
    with open(tmp_path / "train-000002.tar", "r+b") as f:
        f.truncate(1536)
    counts, seen, logged = [], [], ""
    with caplog.at_level(logging.WARNING, logger="chexdist.data.loader"):
        for rank in range(2):
            caplog.clear()
            loader, n = build_train_loader(tmp_path, 4, EVAL, 0, 2, rank, seed=0, epoch=0)
            images, numbers = collect_train(loader)
            assert len(images) == n == 3
            counts.append(loader.skipped)
            seen += numbers
            lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
            assert lines and lines[-1].endswith(f"[{loader.skipped} skipped by this loader]"), lines  # counts are per loader
            named = [re.match(r"skipped (\d+) sample\(s\) of ", line) for line in lines]
            assert sum(int(m.group(1)) if m else 1 for m in named) == loader.skipped, lines
            logged += caplog.text
    assert counts == [3, 16]
    assert not {1, 8} & set(seen) and len(seen) == 2 * 3 * 4
    assert "00000002_000" in logged and "00000009_000" in logged


def test_train_refuses_empty_split(tmp_path):
    write_shards(tmp_path, {"train": [0], "val": [2]})
    with pytest.raises(ChexdistError, match="no samples"):
        build_train_loader(tmp_path, 4, EVAL, 0, 1, 0, seed=0, epoch=0)


# ---------------------------------------------------------------- eval


def eval_pass(root: Path, split: str, batch_size: int, world_size: int, num_workers: int):
    keys, indices, counts = [], [], []
    for rank in range(world_size):
        loader, n = build_eval_loader(root, split, batch_size, EVAL, num_workers, world_size, rank)
        batches = list(loader)
        counts.append((n, len(batches)))
        for b in batches:
            assert b.images.shape == (batch_size, 3, 8, 8) and b.labels.shape == (batch_size, len(LABELS))
            assert b.valid.dtype == torch.bool and len(b.keys) == batch_size
            for row in range(batch_size):
                if b.valid[row]:
                    keys.append(b.keys[row])
                    indices.append(int(b.index[row]))
                    assert numbers_of(b.labels[row : row + 1]) == [int(b.patient_id[row]) - 1]
                elif b.index[row] == -1:
                    assert b.keys[row] == "" and not b.labels[row].any()
    return keys, indices, counts


@pytest.mark.parametrize("split,batch_size,world_size,num_workers", [
    ("train", 4, 2, 0), ("train", 4, 2, 2), ("train", 5, 3, 2), ("val", 2, 2, 0), ("val", 4, 4, 2), ("test", 3, 2, 0),
])
def test_eval_every_sample_once_equal_batches(uneven, split, batch_size, world_size, num_workers):
    root, expected = uneven
    keys, indices, counts = eval_pass(root, split, batch_size, world_size, num_workers)
    assert sorted(keys) == sorted(expected[split]) and len(keys) == len(set(keys))
    assert sorted(indices) == list(range(len(expected[split])))
    assert [expected[split][i] for i in indices] == keys
    assert len({c for pair in counts for c in pair}) == 1


def test_eval_unreadable_samples_are_masked_and_counted(tmp_path):
    expected = write_shards(tmp_path, {"train": [1], "val": [4, 5, 2]}, bad={3: "image"})["val"]
    with open(tmp_path / "val-000002.tar", "r+b") as f:
        f.truncate(1536)
    with tarfile.open(tmp_path / "val-000001.tar") as tar:
        third_sample = [m.offset for m in tar][4]
    with open(tmp_path / "val-000001.tar", "r+b") as f:
        f.seek(third_sample)
        f.write(b"\xff")
    found, lost, skipped = [], [], 0
    for rank in range(2):
        loader, n = build_eval_loader(tmp_path, "val", 3, EVAL, 0, 2, rank)
        batches = list(loader)
        assert len(batches) == n == 2
        skipped += loader.skipped
        for b in batches:
            found += [int(i) for i, v in zip(b.index, b.valid) if v]
            lost += [int(i) for i, v in zip(b.index, b.valid) if not v and i >= 0]
    assert skipped == len(lost) == 6
    assert sorted(found + lost) == list(range(len(expected)))
    assert {2, 6, 7, 8, 9, 10} == set(lost)


def test_eval_on_packed_shards(synth_shards):
    manifest = load_manifest(synth_shards)
    keys = []
    for split in ("val", "test"):
        expected = []
        for url in shard_urls(synth_shards, split, manifest):
            with tarfile.open(url) as tar:
                expected += list(dict.fromkeys(m.name.partition(".")[0] for m in tar))
        got, counts = [], set()
        for rank in range(2):
            loader, n = build_eval_loader(synth_shards, split, 8, EVAL, 0, 2, rank, manifest=manifest)
            batches = list(loader)
            counts |= {n, len(batches)}
            got += [(int(i), k) for b in batches for i, k, v in zip(b.index, b.keys, b.valid) if v]
        assert len(counts) == 1
        assert [k for _, k in sorted(got)] == expected
        keys += expected
    train, n = build_train_loader(synth_shards, 8, AUGMENT, 0, 2, 0, seed=0, epoch=0, manifest=manifest)
    assert len(list(train)) == n == -(-manifest["splits"]["train"]["samples"] // 16)
    assert len(keys) == len(set(keys))


def test_normalize_on_device_matches_normalize_in_loader(uneven):
    root, _ = uneven
    full, n = build_train_loader(root, 4, AUGMENT, 2, 1, 0, seed=2, epoch=0)
    raw, _ = build_train_loader(root, 4, AUGMENT, 2, 1, 0, seed=2, epoch=0, normalize_in_loader=False)
    for (x, y), (u, v) in zip(full, raw):
        assert u.dtype == torch.uint8 and u.shape == (4, 1, 8, 8) and torch.equal(y, v)
        assert torch.allclose(raw.normalize(u), x, atol=1e-6) and torch.equal(full.normalize(x), x)
    batches = list(build_eval_loader(root, "val", 4, EVAL, 0, 2, 1, normalize_in_loader=False)[0])
    assert batches[-1].images.dtype == torch.uint8 and not batches[-1].valid[-1]
    with pytest.raises(ChexdistError, match="normalization"):
        build_train_loader(root, 4, torch.nn.Identity(), 0, 1, 0, seed=0, epoch=0, normalize_in_loader=False)


def test_train_gives_up_when_nothing_decodes(tmp_path):
    write_shards(tmp_path, {"train": [3]}, bad={0: "image", 1: "image", 2: "json"})
    loader, _ = build_train_loader(tmp_path, 2, EVAL, 0, 1, 0, seed=0, epoch=0)
    with pytest.raises(ChexdistError, match="no decodable sample"):
        list(loader)


def _ddp_rank(rank: int, world_size: int, root: str, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    steps = 0
    loader, _ = build_train_loader(root, 4, EVAL, 0, world_size, rank, seed=0, epoch=0)
    for _ in loader:
        together = torch.ones(1)
        dist.all_reduce(together)
        steps += int(together.item() == world_size)
    gathered = []
    loader, _ = build_eval_loader(root, "train", 5, EVAL, 0, world_size, rank)
    for batch in loader:
        parts = [torch.zeros(5, dtype=torch.int64) for _ in range(world_size)]
        dist.all_gather(parts, torch.where(batch.valid, batch.index, -1))
        gathered += [int(i) for part in parts for i in part if i >= 0]
    if rank == 0:
        Path(out).write_text(json.dumps({"steps": steps, "indices": gathered}))
    dist.destroy_process_group()


def test_two_real_ranks_neither_hang_nor_duplicate(uneven, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(_ddp_rank, args=(2, str(uneven[0]), port, str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert sorted(result["indices"]) == list(range(len(uneven[1]["train"])))
    assert result["steps"] == -(-len(uneven[1]["train"]) // 8)


# ---------------------------------------------------------------- start at any batch, seeds, seeks, persistent workers


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


class Counted(torch.nn.Module):
    """Counts the images it sees (main process only: num_workers=0)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return image


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores on purpose
@pytest.mark.parametrize("num_workers,world_size,rank", [(0, 1, 0), (2, 2, 1), (3, 1, 0)])
def test_train_start_batch_equals_the_rest_of_an_uninterrupted_pass(uneven, num_workers, world_size, rank):
    root, _ = uneven
    args = (root, 2, AUGMENT, num_workers, world_size, rank)
    full = batches_of(build_train_loader(*args, seed=4, epoch=1, shuffle_buffer=6)[0])
    n = len(full)
    for k in sorted({1, 2, n // 2, n - 1, n}):
        loader, num_batches = build_train_loader(*args, seed=4, epoch=1, shuffle_buffer=6, start_batch=k)
        assert num_batches == n and len(loader) == n - k
        assert same_batches(batches_of(loader), full[k:]), k


def test_train_start_batch_decodes_nothing_it_skips(uneven):
    root, _ = uneven
    counter = Counted()
    transform = build_transform("strong", image_size=8, eval_resize=10, train=True)
    transform.transforms.insert(0, counter)
    loader, n = build_train_loader(root, 3, transform, 0, 1, 0, seed=0, epoch=0, start_batch=5)
    assert len(batches_of(loader)) == n - 5
    assert counter.calls == (n - 5) * 3


class Draws(torch.nn.Module):
    """Replaces the image with one draw each from Python's, NumPy's and torch's global generators."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        import random

        return torch.tensor([random.random(), np.random.random(), torch.rand(()).item()], dtype=torch.float64)


def test_train_python_and_numpy_generators_differ_by_epoch_rank_worker_and_batch(uneven):
    """Every augmentation generator is seeded per (seed, epoch, rank, worker, batch), not once per worker from a constant."""
    root, _ = uneven
    transform = build_transform("none", image_size=8, eval_resize=10, train=False)
    transform.transforms.append(Draws())

    def draws(epoch: int, rank: int, workers: int) -> list[tuple[float, ...]]:
        loader, _ = build_train_loader(root, 2, transform, workers, 2, rank, seed=3, epoch=epoch)
        return [tuple(x[0].tolist()) for x, _ in loader]

    runs = {(e, r): draws(e, r, 2) for e in (0, 1) for r in (0, 1)}
    firsts = [run[i] for run in runs.values() for i in range(2)]  # both workers' first batches
    for column in range(3):
        values = [f[column] for f in firsts]
        assert len(set(values)) == len(values), f"generator {column} repeats across epochs, ranks or workers"
    assert draws(1, 1, 2) == runs[1, 1]


def test_sample_offsets_open_a_shard_at_any_sample(uneven, tmp_path):
    from chexdist.data.shardformat import sample_offsets

    root, keys = uneven
    url = str(root / "train-000002.tar")
    offsets = sample_offsets(url)
    assert len(offsets) == 12 and offsets[0] == 0
    read = {"seek": 0, "through": 0, "ranged": 0}

    def counter(name):
        def add(n):
            read[name] += n
        return add

    seek = [s["__key__"] for s in iter_tar(url, 10, 1, offsets=offsets, on_read=counter("seek"))]
    through = [s["__key__"] for s in iter_tar(url, 10, 1, on_read=counter("through"))]
    assert seek == through == keys["train"][20:21]
    assert read["through"] >= offsets[10] > read["seek"] > 0
    template = f"pipe:cat {root}/{{name}}"
    assert [s["__key__"] for s in iter_tar(template.format(name="train-000002.tar"), 10, 1, offsets=offsets)] == seek
    ranged = f"pipe:tail -c +$(({{offset}} + 1)) {url}"
    assert [s["__key__"] for s in iter_tar(ranged, 10, 1, offsets=offsets, on_read=counter("ranged"))] == seek
    assert read["ranged"] == read["seek"]
    assert [s["__key__"] for s in iter_tar(ranged, 0, 2)] == keys["train"][10:12]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_sample_offsets_with_long_names(tmp_path, fmt):
    from chexdist.data.shardformat import sample_offsets

    deep = "d" * 90 + "/" + "e" * 60
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in ("a", f"{deep}/b", "c"):
            for ext in ("json", "png"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    offsets = sample_offsets(path)
    for i, key in enumerate(["a", f"{deep}/b", "c"]):
        assert [s["__key__"] for s in iter_tar(str(path), i, 1, offsets=offsets)] == [key]


def test_local_readers_skip_prefixes_that_streams_reread(uneven):
    """One epoch on 3 ranks x 2 workers: the same batches from a folder and a pipe: template, but
    the folder's readers seek to their first sample while the streams read every prefix again."""
    root, _ = uneven
    dataset = sum((root / f"train-00000{i}.tar").stat().st_size for i in range(4))
    read, got = {}, {}
    for where in (root, f"pipe:cat {root}/{{name}}"):
        read[str(where)], got[str(where)] = 0, []
        for rank in range(3):
            loader, _ = build_train_loader(where, 2, EVAL, 2, 3, rank, seed=1, epoch=0)
            got[str(where)] += batches_of(loader)
            read[str(where)] += loader.bytes_read
    local, stream = read[str(root)], read[f"pipe:cat {root}/{{name}}"]
    assert same_batches(got[str(root)], got[f"pipe:cat {root}/{{name}}"])
    assert 0 < local < stream and local < 2 * dataset


def test_ranged_pipe_readers_start_at_their_first_sample(uneven):
    """A pipe: template with an {offset} placeholder (byte-range streams) reads each byte of one epoch
    once, like a folder: bytes_read equals the folder's (the epoch's ceil wrap included), with the same
    batches as reading through; without the placeholder the stream re-reads prefixes."""
    from chexdist.data.shardformat import sample_offsets

    root, _ = uneven
    manifest = load_manifest(root)
    bare = json.loads(json.dumps(manifest))
    for record in manifest["splits"]["train"]["shards"]:
        record["offsets"] = sample_offsets(root / record["name"])
    read, got = {}, {}
    sources = {"local": root, "ranged": f"pipe:tail -c +$(({{offset}} + 1)) {root}/{{name}}", "through": f"pipe:cat {root}/{{name}}"}
    for name, where in sources.items():
        read[name], got[name] = 0, []
        for rank in range(3):
            loader, _ = build_train_loader(where, 2, EVAL, 2, 3, rank, seed=1, epoch=0, manifest=manifest)
            got[name] += batches_of(loader)
            read[name] += loader.bytes_read
    assert same_batches(got["ranged"], got["local"]) and same_batches(got["ranged"], got["through"])
    assert read["ranged"] == read["local"] < read["through"]
    unindexed = 0
    for rank in range(3):  # a manifest without offsets: the placeholder is 0 and readers read through
        loader, _ = build_train_loader(sources["ranged"], 2, EVAL, 2, 3, rank, seed=1, epoch=0, manifest=bare)
        batches_of(loader)
        unindexed += loader.bytes_read
    assert unindexed == read["through"]
    assert load_manifest(sources["ranged"]) == bare


def test_persistent_workers_follow_set_epoch(uneven):
    import os

    root, _ = uneven
    transform = build_transform("strong", image_size=8, eval_resize=10, train=True)
    loader, n = build_train_loader(root, 3, transform, 2, 1, 0, seed=2, epoch=0, persistent_workers=True, normalize_in_loader=False)
    assert loader.loader.persistent_workers
    for epoch, start in ((0, 0), (1, 0), (1, 3), (2, 0)):
        loader.set_epoch(epoch, start)
        fresh, _ = build_train_loader(root, 3, transform, 2, 1, 0, seed=2, epoch=epoch, start_batch=start, normalize_in_loader=False)
        assert same_batches(batches_of(loader), batches_of(fresh)), (epoch, start)
    pids = set()
    probe = build_transform("none", image_size=8, eval_resize=10, train=False)
    probe.transforms.append(Pid())
    pid_loader, _ = build_train_loader(root, 3, probe, 2, 1, 0, seed=2, epoch=0, persistent_workers=True)
    for epoch in range(3):
        pid_loader.set_epoch(epoch)
        pids |= {int(x[0, 0, 0, 0]) for x, _ in pid_loader}
    assert len(pids) == 2 and os.getpid() not in pids
    with pytest.raises(ChexdistError, match="start_batch"):
        loader.set_epoch(0, n + 1)


class Pid(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        import os

        return torch.full_like(image, float(os.getpid()))


def test_eval_loader_repeats_its_pass_with_persistent_workers(uneven):
    loader, _ = build_eval_loader(uneven[0], "val", 2, EVAL, 2, 2, 0, persistent_workers=True)
    first, second = list(loader), list(loader)
    assert len(first) == len(second) and all(torch.equal(a.images, b.images) and torch.equal(a.index, b.index) for a, b in zip(first, second))
