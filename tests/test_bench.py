"""Loader bench smoke test on tiny images: the JSON contract, not the timings."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from chexdist.bench import SUITES, run_suite
from chexdist.errors import ChexdistError


KEYS = {
    "bench", "format", "ours_img_s", "baseline_img_s", "ratio", "workers", "images", "batch_size",
    "ours_cpu_ms", "baseline_cpu_ms", "cpu_ratio",
    "decode_only_img_s", "decode_only_cpu_ms", "stream_1proc_img_s", "stream_1proc_cpu_ms",
    "stream_overhead", "shard_px", "shard_bytes", "cpus",
}
POSITIVE = KEYS - {"bench", "format", "stream_overhead", "cpus"}


def test_loader_bench_prints_one_json_line_per_format(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 48), dtype=np.uint8)).save(images / f"x{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = io.StringIO()
    results = run_suite("loader", out=out, images=images, count=10, workers=1, batch_size=4, size=32,
                        image_size=16, eval_resize=20, repeats=1, work_dir=tmp_path)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == results and [r["format"] for r in lines] == ["png", "jpg"]
    for r in lines:
        assert set(r) == KEYS and r["bench"] == "loader" and r["images"] == 10 and r["workers"] == 1
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in POSITIVE), r
        assert r["stream_overhead"] > -1
    assert list(tmp_path.iterdir()) == [images]


def test_bench_refuses_bad_input(tmp_path):
    assert "loader" in SUITES
    with pytest.raises(ChexdistError, match="unknown bench 'gpu'; choose one of loader"):
        run_suite("gpu")
    with pytest.raises(ChexdistError, match="no .png/.jpg images"):
        run_suite("loader", images=tmp_path)
    with pytest.raises(ChexdistError, match="not a directory"):
        run_suite("loader", images=tmp_path / "missing")


def test_pack_and_train_benches_through_the_cli(tmp_path):
    """`chexdist bench pack|train` print one JSON line each whose ratio is the quotient of its rates."""
    import subprocess
    import sys

    from tests.conftest import REAL_IMAGES, REPO

    def bench(*args: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "chexdist.cli", "bench", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        (line,) = result.stdout.splitlines()
        return json.loads(line)

    pack = bench("pack", "--images", str(REAL_IMAGES), "--count", "8", "--workers", "2", "--size", "64", "--repeats", "2")
    assert pack["bench"] == "pack" and pack["images"] == 8 and pack["workers"] == 2 and pack["repeats"] == 2
    assert pack["ratio"] == pytest.approx(pack["workers_2_img_s"] / pack["workers_1_img_s"], rel=0.01)
    assert len(pack["ratio_runs"]) == 2 and all(r > 0 for r in pack["ratio_runs"])
    assert pack["workers_1_cpu_ms"] > 0 and 0 < pack["workers_2_main_cpu_ms"] < pack["workers_2_cpu_ms"]
    train = bench("train", "--model", "test_resnet", "--image-size", "32", "--batch-size", "4", "--steps", "3", "--repeats", "1")
    assert train["bench"] == "train" and train["device"] == "cpu" and train["precision"] == "no"
    assert train["engine_img_s"] > 0 and train["bare_img_s"] > 0
    assert train["ratio"] == pytest.approx(train["engine_img_s"] / train["bare_img_s"], rel=0.01)
