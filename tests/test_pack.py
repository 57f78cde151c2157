"""Packing: round trips against the CSV, the 70 real images, bad inputs, kill-and-resume, verify."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from chexdist.data import nih
from chexdist.data.images import decode_gray8
from chexdist.labels import LABELS
from chexdist.data.pack import PackSettings, pack_dataset
from chexdist.data.verify import verify_shards
from chexdist.data.shardformat import load_manifest as read_manifest
from tests.conftest import REAL_CSV, REAL_IMAGES, REPO


def read_samples(shard_dir: Path) -> dict[str, tuple[dict, bytes, str]]:
    """key -> (json, image bytes, shard split) read straight from the tar files."""
    samples: dict[str, tuple[dict, bytes, str]] = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, p in parts.items():
            assert key not in samples, f"{key} packed twice"
            image = p.get("png", p.get("jpg"))
            samples[key] = (json.loads(p["json"]), image, tar_path.name.split("-")[0])
    return samples


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexdist.cli", *args], capture_output=True, text=True, cwd=REPO, **kw)


def test_synth_pack_verify_round_trip(synth_root, synth_shards):
    table = nih.read_data_entry(nih.find_data_entry(synth_root)).set_index("image")
    test_list = set(nih.read_image_list(synth_root / "test_list.txt"))
    samples = read_samples(synth_shards)
    assert len(samples) == len(table)
    for key, (meta, image, shard_split) in samples.items():
        row = table.loc[f"{key}.png"]
        assert meta["labels"] == [int(row[label]) for label in LABELS]
        assert meta["patient_id"] == row["patient_id"] and meta["follow_up"] == row["follow_up"]
        assert meta["split"] == shard_split
        assert (meta["split"] == "test") == (meta["image"] in test_list)
        assert min(decode_gray8(image).shape) == 64
    manifest = read_manifest(synth_shards)
    for split, info in manifest["splits"].items():
        mine = [m for m, _, s in samples.values() if s == split]
        assert info["samples"] == len(mine)
        assert info["patients"] == len({m["patient_id"] for m in mine})
        assert list(info["positives"].values()) == np.sum([m["labels"] for m in mine], axis=0).tolist()
    assert manifest["errors"] == 0 and manifest["labels"] == list(LABELS)
    assert manifest["source"]["csv"] == "Data_Entry_2017.csv"
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            with tarfile.open(synth_shards / entry["name"]) as tar:
                firsts = [m.offset for m in tar if m.name.endswith(".json")]  # pack writes json first
            assert entry["offsets"] == firsts and len(firsts) == entry["samples"]
    report = verify_shards(synth_shards)
    assert report["ok"], report["problems"]
    assert report["samples"] == len(table)


def test_pack_real_nih_images(real_data, tmp_path):
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for png in REAL_IMAGES.glob("*.png"):
        (root / "images" / png.name).symlink_to(png)
    shutil.copy(REAL_CSV, root)
    out = tmp_path / "shards"
    manifest = pack_dataset(root, out, PackSettings(size=128, shard_size=20), workers=2, progress=False)
    table = nih.read_data_entry(REAL_CSV).set_index("image")
    samples = read_samples(out)
    assert len(samples) == 70 == sum(v["samples"] for v in manifest["splits"].values())
    for key, (meta, image, _) in samples.items():
        row = table.loc[f"{key}.png"]
        assert meta["labels"] == [int(row[label]) for label in LABELS]
        assert meta["patient_id"] == row["patient_id"] and meta["orig_size"] == [row["orig_width"], row["orig_height"]]
        pixels = decode_gray8(image)
        assert pixels.shape == (128, 128) and pixels.dtype == np.uint8 and pixels.std() > 10
    assert manifest["errors"] == 112_120 - 70 and manifest["error_reasons"] == {"missing": 112_050}
    assert sum(1 for _ in open(out / "errors.jsonl")) == 112_050
    assert verify_shards(out, workers=2)["ok"]


def test_bad_images_are_skipped_listed_and_counted(synth_root, tmp_path):
    root = tmp_path / "nih"
    shutil.copytree(synth_root, root)
    images = sorted((root / "images_001" / "images").glob("*.png"))
    truncated, garbage, deleted = images[3], images[5], images[7]
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"this is not an image")
    deleted.unlink()
    out = tmp_path / "shards"
    result = run_cli("pack", "--nih-root", str(root), "--out", str(out), "--size", "32", "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "skipped 3 input(s)" in result.stdout
    errors = {e["image"]: e["reason"] for e in map(json.loads, open(out / "errors.jsonl"))}
    assert set(errors) == {truncated.name, garbage.name, deleted.name}
    assert errors[truncated.name].startswith("undecodable") and errors[garbage.name].startswith("undecodable")
    assert errors[deleted.name].startswith("missing")
    manifest = read_manifest(out)
    total = len(nih.read_data_entry(nih.find_data_entry(root)))
    assert manifest["errors"] == 3 and sum(v["samples"] for v in manifest["splits"].values()) == total - 3
    assert verify_shards(out)["ok"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nih-root", "/nonexistent/nih"], "is not a directory"),
        (["--nih-root", "{empty}"], "no Data_Entry_2017"),
        (["--nih-root", "{no_images}"], "no images found"),
        (["--nih-root", "{synth}", "--split", "kfold"], "unknown --split 'kfold'"),
        (["--nih-root", "{synth}", "--format", "webp"], "unknown --format 'webp'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, synth_root, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    shutil.copy(synth_root / "Data_Entry_2017.csv", tmp_path / "no_images")
    paths = {"empty": tmp_path / "empty", "no_images": tmp_path / "no_images", "synth": synth_root}
    args = [a.format(**paths) for a in args]
    result = run_cli("pack", *args, "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not list((tmp_path / "out").glob("*.tar"))


def test_verify_detects_tampering(synth_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth_shards, copy)
    victim = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_shards(copy)
    assert not report["ok"] and any("sha256 differs" in p for p in report["problems"])
    result = run_cli("shards", "verify", str(copy))
    assert result.returncode == 1 and "FAIL" in result.stdout
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["offsets"][1] += 512
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert any("sample offsets do not match" in p for p in verify_shards(copy)["problems"])


@pytest.fixture(scope="module")
def kill_root(tmp_path_factory):
    from chexdist.data.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("kill-nih")
    make_synthetic_nih(root, images=72, size=96, seed=1)
    return root


# `chexdist pack` in a process whose image encoder blocks for good at its STOP_AT-th image (3 images
# into the third shard): the kill lands there by construction, however fast or loaded the machine.
BLOCKING_PACK = """
import sys, threading
from pathlib import Path
import chexdist.data.pack as pack
from chexdist.cli.main import main

flag, stop_at, calls, encode = Path(sys.argv[1]), int(sys.argv[2]), [0], pack.encode_sample

def blocking_encode(task):
    calls[0] += 1
    if calls[0] == stop_at:
        flag.write_text("blocked")
        threading.Event().wait()
    return encode(task)

pack.encode_sample = blocking_encode
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_kill_and_resume_gives_identical_shards(kill_root, tmp_path):
    """Killed 3 images into its third shard, a pack re-run keeps the two finished shards as they are
    (same inode and mtime: not rewritten), drops the half-written temp, writes the rest, and ends
    byte-identical to an uninterrupted pack."""
    reference = tmp_path / "reference"
    pack_dataset(kill_root, reference, PackSettings(size=64, shard_size=8), workers=1, progress=False)
    total = len(list(reference.glob("*.tar")))

    out, flag = tmp_path / "resumed", tmp_path / "blocked"
    cmd = ["pack", "--nih-root", str(kill_root), "--out", str(out), "--size", "64", "--shard-size", "8", "--workers", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_PACK, str(flag), str(2 * 8 + 3), *cmd], cwd=REPO)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert flag.exists(), "the pack never reached its blocking image"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name.removesuffix(".json") for p in (out / ".pack").glob("*.tar.json"))
    assert len(finished) == 2 and total > 3
    assert sorted(p.name for p in out.glob("*.tar")) == finished
    assert len(list(out.glob(".*.tmp"))) == 1, "the third shard is half-written under its temp name"
    assert not (out / "manifest.json").exists()
    before = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in finished}

    result = run_cli(*cmd)
    assert result.returncode == 0, result.stderr
    ref_manifest, new_manifest = read_manifest(reference), read_manifest(out)
    assert new_manifest == ref_manifest
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in reference.glob("*.tar"))
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in finished} == before
    assert not list(out.glob(".*.tmp"))
    for shard in reference.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name

    other = run_cli("pack", "--nih-root", str(kill_root), "--out", str(out), "--size", "256", "--quiet")
    assert other.returncode == 2 and "other settings" in other.stderr


def test_shards_info_cli(synth_shards):
    result = run_cli("shards", "info", str(synth_shards))
    assert result.returncode == 0
    manifest = read_manifest(synth_shards)
    assert f"{manifest['splits']['train']['samples']}" in result.stdout and "Hernia" in result.stdout
