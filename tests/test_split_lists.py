"""`chexdist pack --split lists`: a peer's own train/val/test image lists (arnoweng/CheXNet's format:
name, optionally 14 labels), CSV labels packed, disagreeing list labels counted, leakage refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chexdist.cli.main import main
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.data.nih import find_data_entry, read_data_entry
from chexdist.data.pack import PackSettings, pack_dataset
from chexdist.data.shardformat import iter_tar


def write_lists(root: Path, out: Path, flip: int = 0, patient_split=None, with_labels=True) -> tuple[dict, pd.DataFrame]:
    """Lists of whole patients (about 60/15/15%, the rest unlisted); `flip` test rows get Effusion flipped."""
    table = read_data_entry(find_data_entry(root))
    patients = np.sort(table["patient_id"].unique())
    np.random.default_rng(0).shuffle(patients)
    k = len(patients)
    patient_split = patient_split or {
        pid: "train" if i < 0.6 * k else "val" if i < 0.75 * k else "test" if i < 0.9 * k else None
        for i, pid in enumerate(patients)
    }
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        rows = table[table["patient_id"].map(patient_split) == name]
        lines = []
        for i, (_, row) in enumerate(rows.iterrows()):
            labels = [int(row[label]) for label in LABELS]
            if name == "test" and i < flip:
                labels[LABELS.index("Effusion")] ^= 1
            lines.append(row["image"] + (" " + " ".join(map(str, labels)) if with_labels else ""))
        files[name] = out / f"{name}_list.txt"
        files[name].write_text("\n".join(lines) + "\n")
    return files, table.assign(split=table["patient_id"].map(patient_split))


def settings(files: dict, **kw) -> PackSettings:
    return PackSettings(split="lists", size=32, shard_size=40, train_list=str(files["train"]), val_list=str(files["val"]),
                        test_list=str(files["test"]), **kw)


def test_lists_split_packs_csv_labels_and_counts_disagreements(synth_root: Path, tmp_path: Path, capsys):
    files, table = write_lists(synth_root, tmp_path / "lists", flip=4)
    out = tmp_path / "shards"
    assert main(["pack", "--nih-root", str(synth_root), "--out", str(out), "--split", "lists", "--size", "32",
                 "--workers", "1", "--quiet", "--train-list", str(files["train"]), "--val-list", str(files["val"]),
                 "--test-list", str(files["test"])]) == 0
    printed = capsys.readouterr().out
    unlisted = int(table["split"].isna().sum())
    assert f"{unlisted} CSV row(s) in no list" in printed and "4 of " in printed
    manifest = json.loads((out / "manifest.json").read_text())
    lists = manifest["split"]["lists"]
    listed = int(table["split"].notna().sum())
    assert lists["label_disagreements"]["rows"] == 4 and lists["label_disagreements"]["checked"] == listed
    assert lists["label_disagreements"]["by_label"]["Effusion"] == 4 and sum(lists["label_disagreements"]["by_label"].values()) == 4
    assert lists["unlisted_rows"] == unlisted and manifest["split"]["method"] == "lists"
    for name in ("train", "val", "test"):
        expected = table[table["split"] == name]
        assert manifest["splits"][name]["samples"] == len(expected) == lists["files"][name]["images"]
        packed = {}
        for shard in manifest["splits"][name]["shards"]:
            for sample in iter_tar(str(out / shard["name"])):
                meta = json.loads(sample["json"])
                packed[meta["image"]] = meta["labels"]
        assert set(packed) == set(expected["image"])
        csv_labels = expected.set_index("image")[list(LABELS)]
        assert all(packed[image] == csv_labels.loc[image].tolist() for image in packed)  # the CSV's, not the list's
    assert main(["shards", "verify", str(out), "--workers", "1"]) == 0


def test_lists_without_labels_and_resume(synth_root: Path, tmp_path: Path):
    files, _ = write_lists(synth_root, tmp_path / "lists", with_labels=False)
    first = pack_dataset(synth_root, tmp_path / "shards", settings(files), progress=False)
    assert first["split"]["lists"]["label_disagreements"] == {"checked": 0, "rows": 0,
                                                             "by_label": {label: 0 for label in LABELS}, "examples": []}
    again = pack_dataset(synth_root, tmp_path / "shards", settings(files), progress=False)
    assert again["splits"] == first["splits"]
    files["test"].write_text(files["test"].read_text().splitlines()[0] + "\n")  # other lists: refuse to mix
    with pytest.raises(ChexdistError, match="other settings"):
        pack_dataset(synth_root, tmp_path / "shards", settings(files), progress=False)


def test_lists_refuse_leakage_and_bad_lists(synth_root: Path, tmp_path: Path, capsys):
    table = read_data_entry(find_data_entry(synth_root))
    files, _ = write_lists(synth_root, tmp_path / "ok")
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    image = files["test"].read_text().split()[0]
    patient = int(table.loc[table["image"] == image, "patient_id"].iloc[0])
    other = table[(table["patient_id"] == patient) & (table["image"] != image)]["image"]
    assert len(other), "the synthetic data has several images per patient"
    for name in ("train", "val", "test"):
        lines = [l for l in files[name].read_text().splitlines() if l.split()[0] != image]
        if name == "train":
            lines.append(image)  # one image of a test patient moved into train
        (leaky / f"{name}.txt").write_text("\n".join(lines) + "\n")
    leak = {n: leaky / f"{n}.txt" for n in ("train", "val", "test")}
    with pytest.raises(ChexdistError, match=f"patient leakage: 1 patient.*patient {patient}"):
        pack_dataset(synth_root, tmp_path / "s1", settings(leak), progress=False)

    both = dict(files, val=tmp_path / "both.txt")
    both["val"].write_text(files["val"].read_text() + image + "\n")
    with pytest.raises(ChexdistError, match=f"{image} is in both the val and the test list"):
        pack_dataset(synth_root, tmp_path / "s2", settings(both), progress=False)

    unknown = dict(files, test=tmp_path / "unknown.txt")
    unknown["test"].write_text("99999999_000.png\n")
    with pytest.raises(ChexdistError, match="1 listed image.*not in the metadata CSV, e.g. 99999999_000.png"):
        pack_dataset(synth_root, tmp_path / "s3", settings(unknown), progress=False)

    bad = dict(files, val=tmp_path / "bad.txt")
    bad["val"].write_text(f"{image} 0 1 0\n")
    assert main(["pack", "--nih-root", str(synth_root), "--out", str(tmp_path / "s4"), "--split", "lists",
                 "--train-list", str(files["train"]), "--val-list", str(bad["val"]), "--test-list", str(files["test"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.txt line 1: expected an image name, optionally followed by 14 labels 0/1" in err[0]

    assert main(["pack", "--nih-root", str(synth_root), "--out", str(tmp_path / "s5"), "--split", "lists",
                 "--train-list", str(files["train"])]) == 2
    assert "--split lists needs --val-list, --test-list" in capsys.readouterr().err
    assert main(["pack", "--nih-root", str(synth_root), "--out", str(tmp_path / "s6"), "--split", "random",
                 "--test-list", str(files["test"])]) == 2
    assert "only used with --split lists" in capsys.readouterr().err
