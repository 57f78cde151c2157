"""Array-job packing (`chexdist pack --task-index I --num-tasks N`, then `--merge`): the tasks' shards
and the merged manifest are byte-identical to a single-process pack; a missing task is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from chexdist.errors import ChexdistError
from chexdist.data.pack import PackSettings, merge_tasks, pack_dataset, pack_task
from chexdist.data.verify import verify_shards

SETTINGS = PackSettings(split="official", size=32, shard_size=24)


def digests(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.tar")) + [folder / "manifest.json", folder / "errors.jsonl"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def whole(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    pack_dataset(synth_root, out, SETTINGS, progress=False)
    return out


def test_tasks_then_merge_equal_a_whole_pack(synth_root, whole, tmp_path):
    out = tmp_path / "parts"
    records = [pack_task(synth_root, out, SETTINGS, i, 3, progress=False) for i in (2, 0, 1)]
    assert not (out / "manifest.json").exists()
    shards = [name for r in records for name in r["shards"]]
    assert len(shards) == len(set(shards)) == len(list(whole.glob("*.tar")))
    assert sum(r["samples"] for r in records) == 240
    merge_tasks(synth_root, out, SETTINGS, num_tasks=3)
    assert digests(out) == digests(whole)
    assert verify_shards(out)["ok"]


def test_merge_names_the_missing_task_and_a_rerun_fills_it(synth_root, whole, tmp_path):
    out = tmp_path / "parts"
    first = {i: pack_task(synth_root, out, SETTINGS, i, 3, progress=False) for i in (0, 2)}[0]
    stamps = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in first["shards"]}
    with pytest.raises(ChexdistError, match=r"not packed.*task\(s\) 1 of 3"):
        merge_tasks(synth_root, out, SETTINGS, num_tasks=3)
    assert not (out / "manifest.json").exists()
    again = pack_task(synth_root, out, SETTINGS, 0, 3, progress=False)  # finished shards are not redone
    assert again == first
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in first["shards"]} == stamps
    pack_task(synth_root, out, SETTINGS, 1, 3, progress=False)
    merge_tasks(synth_root, out, SETTINGS, num_tasks=3)
    assert digests(out) == digests(whole)


def test_merge_refuses_a_changed_shard_and_an_empty_folder(synth_root, tmp_path):
    with pytest.raises(ChexdistError, match="no pack task has run"):
        merge_tasks(synth_root, tmp_path / "empty", SETTINGS)
    out = tmp_path / "parts"
    pack_task(synth_root, out, SETTINGS, 0, 1, progress=False)
    shard = sorted(out.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ChexdistError, match=f"{shard.name}: sha256 differs"):
        merge_tasks(synth_root, out, SETTINGS)
    with pytest.raises(ChexdistError, match="--task-index 1 must be in 0..0"):
        pack_task(synth_root, out, SETTINGS, 1, 1)
