"""Data lineage: best.json and metrics.jsonl name the shards (manifest sha256, split and patient
counts) and the run keeps a digest of its training patients; `chexdist evaluate` refuses test
shards that share patients with them, in one line, before scoring anything."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile

import pytest

from chexdist.data.lineage import check_no_training_overlap, shards_lineage, sources
from chexdist.errors import ChexdistError
from tests.test_train import metrics, run, train_cmd


@pytest.fixture(scope="module")
def lineage_run(train_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lineage") / "run"
    done = run(train_cmd(train_shards, out, "train.epochs=1", "data.max_train_batches=2"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def train_patients(shards) -> set[str]:
    """Independently: every train sample's patient_id, read from the tar files themselves."""
    ids = set()
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            ids.update(json.load(tar.extractfile(m))["patient_id"] for m in tar.getmembers() if m.name.endswith(".json"))
    return ids


@pytest.mark.slow
def test_best_json_and_metrics_record_the_shards_and_a_patient_digest(lineage_run, train_shards):
    manifest = json.loads((train_shards / "manifest.json").read_text())
    best = json.loads((lineage_run / "best.json").read_text())
    (source,) = best["data"]["shards"]
    assert source["manifest_sha256"] == hashlib.sha256((train_shards / "manifest.json").read_bytes()).hexdigest()
    assert source["dataset"] == "nih" and source["shards"] == str(train_shards)
    for split, info in manifest["splits"].items():
        assert source["splits"][split] == {"samples": info["samples"], "patients": info["patients"]}
    assert metrics(lineage_run)[0]["data"] == best["data"]["shards"]
    ids = train_patients(train_shards)
    digest = json.loads((lineage_run / "train_patients.json").read_text())
    expected = sorted(hashlib.sha256(f"nih:{p}".encode()).hexdigest()[:16] for p in ids)
    assert digest["hashes"] == expected and digest["count"] == len(ids) == best["data"]["train_patients"]["count"]
    assert not any(str(p) in (lineage_run / "train_patients.json").read_text() for p in list(ids)[:20] if len(str(p)) > 3)


@pytest.mark.slow
def test_evaluate_refuses_test_shards_sharing_training_patients(lineage_run, train_shards, tmp_path):
    check_no_training_overlap(lineage_run, train_shards, "test")  # the packed test split shares no patient
    leaky = tmp_path / "leaky"
    shutil.copytree(train_shards, leaky)
    manifest = json.loads((leaky / "manifest.json").read_text())
    manifest["splits"]["test"] = manifest["splits"]["train"]  # a "test" split made of training shards
    (leaky / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChexdistError, match="training patients"):
        check_no_training_overlap(lineage_run, str(leaky), "test")
    done = run([sys.executable, "-m", "chexdist.cli", "evaluate", "--run", str(lineage_run), "--shards", str(leaky),
                "--split", "test", "--no-progress"], timeout=300)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert f"{len(train_patients(train_shards))} training patients" in line and "patient(s) of the test split" in line
    assert not (lineage_run / "eval-test").exists()


def test_mixtures_give_one_entry_per_source_folder(train_shards, synth_shards):
    assert sources(str(train_shards)) == [str(train_shards)] and sources([train_shards, synth_shards]) == [str(train_shards), str(synth_shards)]
    entries = shards_lineage([str(train_shards), str(synth_shards)])
    assert [e["shards"] for e in entries] == [str(train_shards), str(synth_shards)]
    assert entries[0]["manifest_sha256"] != entries[1]["manifest_sha256"]
