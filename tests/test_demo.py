"""`chexdist demo`, the README's first command, run as a user runs it (default settings, 2 processes):
it replaces only a folder an earlier demo made, and prints the mean val AUROC the README states."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# The demo is seeded, so in the CI environment it prints the README's figure to its 3 decimals; 0.01
# leaves room for float differences of another CPU or BLAS, far below what a broken step costs
# (`chexdist demo --epochs 2` prints 0.819).
TOLERANCE = 0.01


def demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexdist", "demo", "--out", str(out), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=1200)


def readme_auroc() -> float:
    found = re.search(r"`chexdist demo` printed mean val AUROC (0\.\d+)", (REPO / "README.md").read_text())
    assert found, "README.md no longer states the demo's mean val AUROC"
    return float(found.group(1))


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = demo(out)
    assert done.returncode == 2 and "is not an earlier demo's folder" in done.stderr
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_demo_replaces_an_earlier_demo_and_prints_the_readme_auroc(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".chexdist-demo").write_text("made by chexdist demo; safe to delete\n")
    (out / "stale.txt").write_text("from an earlier demo")
    done = demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "stale.txt").exists() and (out / ".chexdist-demo").is_file()
    assert "[3/3] train: recipe tiny, 2 processes" in done.stdout
    mean = re.search(r"^mean\s+(\d\.\d{3})\s+(\d\.\d{3})$", done.stdout, re.MULTILINE)
    assert mean, done.stdout[-2000:]
    assert float(mean.group(1)) == pytest.approx(readme_auroc(), abs=TOLERANCE)
