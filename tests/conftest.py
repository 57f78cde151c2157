"""Shared fixtures: real NIH reference data (read-only, beside the repo) and one small synthetic
NIH-format download packed into shards, built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
REAL_CSV = SHARED_DATA / "Data_Entry_2017_v2020.csv.gz"
REAL_BBOX = SHARED_DATA / "BBox_List_2017.csv.gz"
REAL_IMAGES = SHARED_DATA / "nih-sample" / "images"

os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest test files, longest first (per-file times of a run with --durations=0): collected first,
# so that pytest-xdist's --dist loadfile starts them early and the run does not end waiting on one
# of them while the other workers idle. Test order within a file is unchanged.
LONGEST_FIRST = ("test_launch.py", "test_slurm.py", "tune/test_resume.py", "tune/test_search.py", "test_bench_tune.py",
                 "test_train.py", "test_scale.py", "tune/test_failures.py", "test_reader_signals.py", "tune/test_pbt.py",
                 "test_demo.py", "test_mixture.py", "test_new_user.py", "test_behaviour_training.py")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = item.path.relative_to(REPO / "tests").as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A session fixture's folder, built once per test run. Under pytest-xdist every worker is its
    own session, so the first worker to ask builds it in the run's shared temp folder, under a file
    lock, and the others wait and reuse it (the xdist docs' pattern). Treat it as read-only."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{folder}.lock"):
        if not (folder.parent / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_CSV.is_file():
        pytest.fail(f"reference data missing: {REAL_CSV} (the repo expects ../shared/data beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from chexdist.data.synth import make_synthetic_nih

    return built_once(tmp_path_factory, "synth-nih", lambda root: make_synthetic_nih(root, images=240, size=64, seed=0))


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    from chexdist.data.pack import PackSettings, pack_dataset

    def build(folder: Path) -> None:
        pack_dataset(synth_root, folder / "synth", PackSettings(split="official", size=64, shard_size=32), workers=1,
                     progress=False)

    return built_once(tmp_path_factory, "shards", build) / "synth"


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Shards the tiny recipe learns from (900 images, 72 px), shared by the training tests."""
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    def build(root: Path) -> None:
        make_synthetic_nih(root / "nih", images=900, size=96, seed=0)
        pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=72, shard_size=100), workers=2,
                     progress=False)

    return built_once(tmp_path_factory, "train-data", build) / "shards"


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """Synthetic shards with a validation split large enough to tune thresholds on (20% of train_val).
    160 px files (boxes in `eval_shards.parent / "nih" / "BBox_List_2017.csv"`) packed at 144, so the
    model below sees 128 px crops and its last block is a 4x4 grid that Grad-CAM can point with."""
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    def build(root: Path) -> None:
        make_synthetic_nih(root / "nih", images=1200, size=160, seed=1)
        settings = PackSettings(split="official", size=144, shard_size=100, val_fraction=0.2)
        pack_dataset(root / "nih", root / "shards", settings, workers=1, progress=False)

    return built_once(tmp_path_factory, "eval-data", build) / "shards"


@pytest.fixture(scope="session")
def trained_run(eval_shards, tmp_path_factory) -> Path:
    """ONE tiny model trained (tiny recipe, 4 epochs, 128 px crops, a real `python -m chexdist.train` process) and
    shared by the evaluation, prediction and Grad-CAM tests. Treat it as read-only: copy it to change it."""
    import subprocess
    import sys

    def build(folder: Path) -> None:
        cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(eval_shards), "--out",
               str(folder / "run"), "--no-progress", "--set", "train.epochs=4", "--set", "data.image_size=128",
               "--set", "data.eval_resize=144"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        if done.returncode != 0:
            pytest.fail(f"training the shared tiny model failed: {done.stderr[-2000:]}")

    return built_once(tmp_path_factory, "trained", build) / "run"
