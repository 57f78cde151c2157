"""`chexdist shards verify` catches what a checksum cannot: shards rewritten with a patient in two
splits, a wrong label, or an undecodable image, and the manifest's sha256s, byte counts and offsets
rewritten to match, so only verify's content checks can name the fault."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from chexdist.data.shardformat import sample_offsets
from chexdist.data.verify import verify_shards
from chexdist.utils.fileio import sha256_file


def rewrite_member(shard_dir: Path, split: str, index: int, part: str, edit: Callable[[bytes], bytes]) -> tuple[str, str]:
    """Replace `part` of sample `index` in the first shard of `split` by `edit(part)`, then make the
    manifest's record of that shard (sha256, bytes, offsets) match the new file. Returns (shard, key)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    record = manifest["splits"][split]["shards"][0]
    path = shard_dir / record["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    key = keys[index]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{key}.{part}":
                data = edit(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    record.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    if "offsets" in record:
        record["offsets"] = sample_offsets(path)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    return record["name"], key


def edit_json(**changes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        meta = json.loads(data)
        for name, change in changes.items():
            meta[name] = change(meta[name])
        return json.dumps(meta).encode()

    return edit


def tampered(synth_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    assert verify_shards(copy)["ok"], "the fixture shards must verify before the edit"
    return copy


def problems_of(shard_dir: Path) -> list[str]:
    report = verify_shards(shard_dir)
    assert not report["ok"]
    assert not any("sha256" in p or "offsets" in p for p in report["problems"]), report["problems"]
    return report["problems"]


def first_patient(shard_dir: Path, split: str) -> int:
    record = json.loads((shard_dir / "manifest.json").read_text())["splits"][split]["shards"][0]
    with tarfile.open(shard_dir / record["name"]) as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
        return json.loads(tar.extractfile(member).read())["patient_id"]


def test_verify_names_a_patient_in_two_splits(synth_shards, tmp_path):
    copy = tampered(synth_shards, tmp_path)
    train_patient = first_patient(copy, "train")
    rewrite_member(copy, "test", 0, "json", edit_json(patient_id=lambda _: train_patient))
    leaks = [p for p in problems_of(copy) if "patient leakage" in p]
    assert leaks and f"patient {train_patient} in ['test', 'train']" in leaks[0]


def test_verify_names_the_split_whose_labels_changed(synth_shards, tmp_path):
    copy = tampered(synth_shards, tmp_path)
    rewrite_member(copy, "val", 1, "json", edit_json(labels=lambda labels: [1 - v for v in labels]))
    # format 2 counts negatives too, so a flipped label shows in both tables
    assert problems_of(copy) == ["val: positives per label differ from the manifest",
                                 "val: negatives per label differ from the manifest"]


def test_verify_names_an_undecodable_image_behind_a_matching_sha256(synth_shards, tmp_path):
    copy = tampered(synth_shards, tmp_path)
    shard, key = rewrite_member(copy, "train", 2, "png", lambda data: data[:8] + b"\0" * 64)
    problems = problems_of(copy)
    assert any(p.startswith(f"{shard}/{key}: image does not decode") for p in problems), problems
