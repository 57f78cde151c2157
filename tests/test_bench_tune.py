"""`chexdist bench tune` on a tiny search, and `chexdist tune` / `bench tune` without Ray installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO

EXTRA = "pip install 'chexdist[tune]'"


def chexdist(args: list[str], env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexdist.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture
def without_ray(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import ray (a sitecustomize that blocks it), as without the [tune] extra."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}


@pytest.mark.parametrize("args", [["tune", "--shards", "shards/nowhere"], ["bench", "tune"]])
def test_without_ray_one_line_names_the_extra(args, without_ray):
    done = chexdist(args, env=without_ray)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and EXTRA in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.slow
def test_bench_tune_prints_its_json_lines(synth_shards):
    """A tiny search (1 epoch, 2 batches) on the session's small synthetic shards, not the bench's own
    600 images (synth + pack, each tested on its own, would cost a pack here): every stdout line is one
    JSON result, first the trial overhead."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    done = chexdist(["bench", "tune", "--epochs", "1", "--steps", "2", "--shards", str(synth_shards)],
                    env={"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["bench"], r["case"]) for r in results] == [("tune", "trial_overhead"), ("tune", "ddp2_trial")]
    first, ddp = results
    assert first["epochs"] == 1 and first["train_images"] > 0 and first["plain_fit_s"] > 0 and first["trial_warm_s"] > 0
    assert ddp["workers"] == 2 and ddp["train_images"] > 0 and ddp["trial_s"] > 0 and ddp["train_nproc2_s"] > 0
