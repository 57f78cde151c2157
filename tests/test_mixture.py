"""Mixed-dataset training (`data.shards` as a list): every sample once an epoch on 2 real processes,
exact resume, exactly-once evaluation with namespaced patients, weights, and the union leakage check."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from chexdist.config import load_config
from chexdist.data.loader import build_eval_loader, build_train_loader
from chexdist.data.mixture import check_union_leakage, load_sources, shares
from chexdist.data.shardindex import write_index
from chexdist.errors import ChexdistError
from chexdist.training.launcher import free_port
from tests.test_data import AUGMENT, EVAL, batches_of, numbers_of, same_batches, write_shards

A_TRAIN, B_TRAIN = list(range(0, 9)), list(range(12, 21))  # label numbers (see write_shards) of each folder's train split


def _folder(root: Path, layout: dict, dataset: str | None, indexed: bool) -> Path:
    """Shards by test_data.write_shards; a 'pad' split only moves the numbers on and is left out of the manifest."""
    write_shards(root, layout)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"].pop("pad", None)
    (root / "manifest.json").write_text(json.dumps({**manifest, **({"dataset": dataset} if dataset else {})}))
    if indexed:
        for shard in root.glob("*.tar"):
            write_index(shard)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    """A: an NIH folder (train numbers 0-8, val 9-11), indexed; B: another dataset (train 12-20, val 21-24),
    read through the tar reader."""
    root = tmp_path_factory.mktemp("mixture")
    a = _folder(root / "a", {"train": [5, 4], "val": [3]}, None, True)
    b = _folder(root / "b", {"pad": [12], "train": [6, 3], "val": [2, 2]}, "other", False)
    return [str(a), str(b)]


def _mixed_rank(rank: int, world_size: int, folders: list[str], port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))

    def gathered(values: torch.Tensor) -> list[int]:
        parts = [torch.zeros_like(values) for _ in range(world_size)]
        dist.all_gather(parts, values)
        return [int(v) for part in parts for v in part]

    result: dict = {"epochs": [], "resumed": True, "eval": []}
    for epoch in range(2):
        loader, n = build_train_loader(folders, 3, AUGMENT, 0, world_size, rank, seed=9, epoch=epoch, shuffle_buffer=4)
        full = batches_of(loader)
        result["epochs"].append(gathered(torch.tensor([v for _, y in full for v in numbers_of(y)])))
        resumed, _ = build_train_loader(folders, 3, AUGMENT, 0, world_size, rank, seed=9, epoch=epoch, shuffle_buffer=4, start_batch=1)
        result["resumed"] &= same_batches(batches_of(resumed), full[1:]) and len(full) == n
    for batch in build_eval_loader(folders, "val", 2, EVAL, 1, world_size, rank)[0]:
        rows = torch.stack([torch.where(batch.valid, batch.index, -1), batch.patient_id, torch.tensor(numbers_of(batch.labels))], 1)
        result["eval"] += [r for r in zip(*[iter(gathered(rows.flatten()))] * 3) if r[0] >= 0]
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def code(dataset: str, patient: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{dataset}:{patient}".encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@pytest.mark.slow
def test_two_real_processes_see_every_sample_once_and_resume_exactly(folders, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "result.json"
    mp.spawn(_mixed_rank, args=(2, folders, free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    for seen in result["epochs"]:
        assert sorted(seen) == A_TRAIN + B_TRAIN
    assert result["epochs"][0] != result["epochs"][1] and result["resumed"]
    rows = sorted(result["eval"])
    val = list(range(9, 12)) + list(range(21, 25))  # A's val, then B's, numbered across the union
    assert [r[0] for r in rows] == list(range(7)) and [r[2] for r in rows] == val
    assert [r[1] for r in rows] == [code("nih", n + 1) for n in val[:3]] + [code("other", n + 1) for n in val[3:]]


def test_weights_share_an_epoch_and_resume_exactly(folders):
    manifest = load_sources(folders, [3, 1])
    assert shares([9, 9], [3.0, 1.0]) == [14, 4] and manifest["mixture"]["sources"][0]["weight"] == 3
    epochs = []
    for epoch in range(2):
        loader, n = build_train_loader(folders, 3, AUGMENT, 0, 2, 1, seed=2, epoch=epoch, manifest=manifest)
        full = batches_of(loader)
        resumed = batches_of(build_train_loader(folders, 3, AUGMENT, 0, 2, 1, seed=2, epoch=epoch, manifest=manifest, start_batch=2)[0])
        assert same_batches(resumed, full[2:])
        other = batches_of(build_train_loader(folders, 3, AUGMENT, 0, 2, 0, seed=2, epoch=epoch, manifest=manifest)[0])
        epochs.append(Counter(v for _, y in full + other for v in numbers_of(y)))
    for seen in epochs:
        assert sum(seen[v] for v in A_TRAIN) == 14 and set(A_TRAIN) <= set(seen)  # 14 of A: each at least once
        assert sum(seen[v] for v in B_TRAIN) == 4 == len(set(seen) & set(B_TRAIN))  # 4 distinct of B
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("indexed", [True, False])
def test_a_patient_in_two_splits_of_the_union_is_refused(tmp_path, indexed):
    a = _folder(tmp_path / "a", {"train": [4], "val": [2]}, None, indexed)
    b = _folder(tmp_path / "b", {"val": [3]}, None, indexed)  # patients 1-3: in A's train
    with pytest.raises(ChexdistError, match=r"patient nih:1 is in .* split 'train' and in .* split 'val'"):
        check_union_leakage(load_sources([str(a), str(b)]))
    c = _folder(tmp_path / "c", {"pad": [6], "val": [3]}, None, indexed)  # patients 7-9: nowhere else
    check_union_leakage(load_sources([str(a), str(c)]))
    renamed = _folder(tmp_path / "d", {"val": [3]}, "other", indexed)  # same numbers, another dataset
    check_union_leakage(load_sources([str(a), str(renamed)]))


def test_config_takes_a_list_and_bad_mixtures_get_one_line(folders):
    assert load_config(overrides=[f"data.shards=[{folders[0]}, {folders[1]}]", "data.shard_weights=[2, 1]"]).data.shards == folders
    assert load_config(overrides=["data.shards=shards/nih"]).data.shards == "shards/nih"
    with pytest.raises(ChexdistError, match="shard_weights"):
        load_config(overrides=["data.shard_weights=[2, 0]"])
    with pytest.raises(ChexdistError, match="2 weights for 1 shard folders"):
        load_sources(folders[:1], [1, 2])
    with pytest.raises(ChexdistError, match="twice"):
        load_sources([folders[0], folders[0]])


@pytest.fixture(scope="module")
def packed_pair(tmp_path_factory) -> list[str]:
    """Two packed synthetic folders (indexed shards); the second's manifest names another dataset."""
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("packed-pair")
    for i, name in enumerate(["a", "b"]):
        make_synthetic_nih(root / f"nih-{name}", images=64, size=40, seed=i)
        pack_dataset(root / f"nih-{name}", root / name, PackSettings(split="random", size=32, shard_size=16), workers=1, progress=False)
    manifest = json.loads((root / "b" / "manifest.json").read_text())
    (root / "b" / "manifest.json").write_text(json.dumps({**manifest, "dataset": "other"}))
    return [str(root / "a"), str(root / "b")]


def _two_process_train(out: Path, *sets: str) -> list[str]:
    """`accelerate launch` of chexdist/train.py on 2 CPU processes, data.shards given by --set (not --shards)."""
    import sys

    from tests.test_scale import TRAIN_PY

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), TRAIN_PY, "--recipe", "tiny", "--out", str(out), "--no-progress",
            *[arg for s in sets for arg in ("--set", s)]]


@pytest.mark.slow
def test_engine_trains_a_mixture_on_two_processes_and_resumes_exactly(packed_pair, tmp_path):
    from tests.test_scale import ENV, metrics, run

    env = dict(ENV, ACCELERATE_USE_CPU="1")
    sets = (f"data.shards=[{packed_pair[0]}, {packed_pair[1]}]", "data.num_workers=0", "data.max_train_batches=3")
    for out, epochs, extra in (("whole", 2, []), ("half", 1, []), ("half", 2, ["--resume"])):
        done = run([*_two_process_train(tmp_path / out, *sets, f"train.epochs={epochs}"), *extra], env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "half")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2] and a[0]["world_size"] == 2
    for key in ("train_loss", "val_loss", "val_auc_mean"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-6, abs=1e-9), key
    best = json.loads((tmp_path / "whole" / "best.json").read_text())
    assert best["config"]["data"]["shards"] == packed_pair and len(best["shards"]["source"]["mixture"]) == 2
