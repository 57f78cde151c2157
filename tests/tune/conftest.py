"""Fixtures of the Ray Tune tests: a real local Ray on CPU, trials running `engine.fit` on tiny
synthetic shards. Every Ray session of a module lives under a short private RAY_TMPDIR, so the
module's finalizer can check that no Ray process of ours is left running (other users' Ray processes
are not counted)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import built_once
from tests.tune.kit import ray_processes_under


@pytest.fixture(scope="module")
def ray_tmp():
    """A short private Ray temp dir (Unix socket paths must stay under ~107 characters). Its finalizer,
    after the module's last Ray test whatever the order, checks that nothing started under it is still
    alive: Ray's processes may take a moment to exit after ray.shutdown(), so it polls for up to 30 s."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    old = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=folder, RAY_AUTH_MODE="disabled")
    yield folder
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    deadline = time.monotonic() + 30
    while (left := ray_processes_under(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes of this module still alive 30 s after the last test: {left}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    def build(root: Path) -> None:
        make_synthetic_nih(root / "nih", images=300, size=64, seed=0)
        pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=48, shard_size=64), workers=1,
                     progress=False)

    return built_once(tmp_path_factory, "tune-data", build) / "shards"
