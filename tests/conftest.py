"""Shared fixtures: real NIH reference data (read-only, beside the repo) and one small synthetic
NIH-format download packed into shards, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
REAL_CSV = SHARED_DATA / "Data_Entry_2017_v2020.csv.gz"
REAL_BBOX = SHARED_DATA / "BBox_List_2017.csv.gz"
REAL_IMAGES = SHARED_DATA / "nih-sample" / "images"

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_CSV.is_file():
        pytest.fail(f"reference data missing: {REAL_CSV} (the repo expects ../shared/data beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from chexdist.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("synth-nih")
    make_synthetic_nih(root, images=240, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    from chexdist.pack import PackSettings, pack_dataset

    out = tmp_path_factory.mktemp("shards") / "synth"
    pack_dataset(synth_root, out, PackSettings(split="official", size=64, shard_size=32), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> Path:
    """900 synthetic images packed for training tests (train 672 / val 70 / test 158)."""
    from chexdist.pack import PackSettings, pack_dataset
    from chexdist.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("train-data")
    make_synthetic_nih(root / "nih", images=900, size=96, seed=0)
    pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=72, shard_size=100), workers=2, progress=False)
    return root / "shards"
