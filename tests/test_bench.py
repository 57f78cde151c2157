"""Loader bench smoke test on tiny images: the JSON contract, not the timings."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from chexdist.bench.suites import SUITES, run_suite
from chexdist.errors import ChexdistError

COMMON = {"bench", "format", "workers", "images", "batch_size", "ours_px", "image_size", "shard_bytes", "cpus", "comparison",
          "ours_img_s", "baseline_img_s", "ratio", "ours_cpu_ms", "baseline_cpu_ms", "cpu_ratio", "baseline_px", "baseline_format"}
STREAM = {"decode_only_img_s", "decode_only_cpu_ms", "stream_1proc_img_s", "stream_1proc_cpu_ms", "stream_overhead", "pipeline_overhead",
          "ours_steady_cpu_ms", "baseline_steady_cpu_ms", "pipeline_overhead_steady", "stage_cpu_ms", "glue_cpu_ms",
          "ours_steady_main_cpu_ms", "baseline_steady_main_cpu_ms", "img_s_per_core_steady", "cores_for_reference", "reference",
          "decoder_cpu_ms", "decoder_fastest", "steady_split", "gpu_steady_cpu_ms", "gpu_steady_main_cpu_ms", "bare_uint8_cpu_ms",
          "bare_parallel_cpu_ms", "gpu_steady_overhead", "gpu_steady_overhead_parallel"}
DEVICE_AUG = {"preset", "worker_px", "load_px", "steady", "workers_aug_cpu_ms", "workers_load_cpu_ms", "worker_cpu_ratio", "device_aug_cpu_ms",
              "device_params_cpu_ms"}
POSITIVE = {"ours_img_s", "baseline_img_s", "ratio", "ours_cpu_ms", "baseline_cpu_ms", "cpu_ratio", "shard_bytes"}


def assert_overhead(overhead: float, ours_ms: float, base_ms: float) -> None:
    """overhead == ours / base - 1, within what rounding the printed figures (3 decimals) allows: tiny
    images make base_ms small, and the ratio of two rounded figures moves by up to this bound."""
    bound = 0.0005 * (1 / base_ms + ours_ms / base_ms**2) + 0.0006
    assert abs(overhead - (ours_ms / base_ms - 1)) <= bound, (overhead, ours_ms, base_ms)


def test_loader_bench_prints_two_comparisons_per_format(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 48), dtype=np.uint8)).save(images / f"x{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = io.StringIO()
    results = run_suite("loader", out=out, images=images, count=10, workers=1, batch_size=4, size=32,
                        image_size=16, eval_resize=20, repeats=1, work_dir=tmp_path)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == results
    assert [(r["format"], r["comparison"]) for r in lines] == [
        (f, c) for f in ("png", "jpg") for c in ("packed (pre-resized) vs raw files", "stream vs same-resolution files",
                                                 "augmentation in the workers vs on the device")
    ]
    for r in lines:
        if r["comparison"].startswith("augmentation"):
            assert set(r) == set(COMMON) - set(POSITIVE) - {"baseline_px", "baseline_format"} | DEVICE_AUG | {"shard_bytes"}
            assert r["worker_px"] == 32 and r["load_px"] == 23 and r["steady"] and all(r[k] >= 0 for k in DEVICE_AUG if k.endswith("_ms"))
            assert r["device_aug_cpu_ms"] > 0  # the workers' figures are /proc ticks (10 ms): 10 tiny images may read 0
            if r["worker_cpu_ratio"] is not None:
                assert r["worker_cpu_ratio"] == pytest.approx(r["workers_aug_cpu_ms"] / r["workers_load_cpu_ms"], rel=0.02)
            continue
        same_res = r["comparison"].startswith("stream")
        assert set(r) == COMMON | (STREAM if same_res else set()) and r["images"] == 10 and r["workers"] == 1
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in POSITIVE), r
        assert r["ours_px"] == 32 and r["baseline_px"] == ([32] if same_res else [48])
        assert r["baseline_format"] == ([r["format"]] if same_res else ["png"])
        if same_res:
            assert r["stream_overhead"] > -1 and r["pipeline_overhead"] > -1 and r["decode_only_cpu_ms"] > 0
            assert r["ours_steady_cpu_ms"] > 0 and r["baseline_steady_cpu_ms"] > 0
            assert 0 <= r["ours_steady_main_cpu_ms"] <= r["ours_steady_cpu_ms"]
            assert 0 <= r["baseline_steady_main_cpu_ms"] <= r["baseline_steady_cpu_ms"]
            stages = r["stage_cpu_ms"]
            assert list(stages) == ["read", "labels", "decode", "transform", "seeding", "collate", "normalize"]
            assert all(v >= 0 for v in stages.values()) and stages["decode"] > 0
            assert set(r["decoder_cpu_ms"]) == ({"torchvision", "pil", "pil_draft"} if r["format"] == "jpg" else {"torchvision", "pil"})
            assert r["cores_for_reference"] == pytest.approx(r["reference"]["train_img_s"] * r["gpu_steady_cpu_ms"] / 1e3, abs=0.01)
            assert 0 <= r["gpu_steady_main_cpu_ms"] <= r["gpu_steady_cpu_ms"] and r["bare_parallel_cpu_ms"] > 0
            assert_overhead(r["gpu_steady_overhead"], r["gpu_steady_cpu_ms"], r["bare_uint8_cpu_ms"])
            assert_overhead(r["gpu_steady_overhead_parallel"], r["gpu_steady_cpu_ms"], r["bare_parallel_cpu_ms"])
            assert r["glue_cpu_ms"] == pytest.approx(r["stream_1proc_cpu_ms"] - sum(stages.values()), abs=1e-3)
            split = r["steady_split"]
            assert set(split) == {f"{who}_{what}" for who in ("main", "workers") for what in ("user_ms", "sys_ms", "faults")}
            assert all(v >= 0 for v in split.values())  # clock ticks of 10 ms: 10 tiny images may read 0
    assert list(tmp_path.iterdir()) == [images]


def test_resume_and_reads_benches():
    from tests.conftest import REAL_IMAGES

    resume = run_suite("resume", out=io.StringIO(), images=REAL_IMAGES, count=24, batch_size=4, size=64, repeats=1)
    assert [r["start_batch"] for r in resume] == [0, 5] and all(r["num_batches"] == 6 for r in resume)
    assert all(r["before_s"] > 0 and r["after_s"] > 0 for r in resume)
    local, stream, ranged, http = run_suite("reads", out=io.StringIO(), ranks=2, workers=2, shards=5, count=40)
    assert [r["source"] for r in (local, stream, ranged, http)] == ["local", "stream", "stream-ranged", "http"]
    assert local["dataset_bytes"] == stream["dataset_bytes"] == ranged["dataset_bytes"] == http["dataset_bytes"]
    assert 0 < local["bytes_read"] < ranged["bytes_read"] < stream["bytes_read"]  # local shards are indexed: image bytes only
    assert 0 < local["bytes_read"] < http["bytes_read"] <= ranged["bytes_read"] and http["bytes_sent"] <= 1.01 * http["dataset_bytes"]
    assert http["sent_ratio"] == round(http["bytes_sent"] / http["dataset_bytes"], 3) and "bytes_sent" not in local
    assert local["read_ratio"] == round(local["bytes_read"] / local["dataset_bytes"], 3)


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
    train = bench("train", "--model", "test_resnet", "--image-size", "32", "--batch-size", "4", "--steps", "3", "--repeats", "1", "--switches", "none")
    assert train["bench"] == "train" and train["device"] == "cpu" and train["precision"] == "no"
    assert train["engine_img_s"] > 0 and train["bare_img_s"] > 0
    assert train["ratio"] == pytest.approx(train["engine_img_s"] / train["bare_img_s"], rel=0.01)
