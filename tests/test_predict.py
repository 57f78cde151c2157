"""`chexdist predict` on real 1024 px X-rays with a model trained in the session: probabilities equal
the gathered inference over the same images packed into shards; 16-bit, RGBA and palette files give
the same result as the 8-bit original; warnings for inputs unlike the training data; bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from chexdist.cli import main as cli
from chexdist.data.images import load_gray8
from chexdist.evaluation.predict import predict_files
from tests.conftest import REAL_CSV, REAL_IMAGES


@pytest.fixture(scope="module")
def real_images(real_data):
    images = sorted(REAL_IMAGES.glob("*.png"))
    assert len(images) == 70
    return images


@pytest.fixture(scope="module")
def predictions(trained_run, real_images):
    return predict_files(trained_run, [REAL_IMAGES], batch_size=16, progress=False)


def test_probabilities_match_evaluate_on_the_packed_images(trained_run, real_images, predictions, tmp_path):
    """The 70 real images packed at the run's size and scored by `chexdist evaluate` (its
    predictions.csv) get the probabilities predict gives for the original files."""
    from chexdist.evaluation.evaluate import evaluate_run, read_predictions
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.shardformat import load_manifest

    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    names = {p.name for p in real_images}
    for p in real_images:
        (nih / "images" / p.name).symlink_to(p)
    with gzip.open(REAL_CSV, "rt") as f:
        lines = f.read().splitlines()
    rows = [line for line in lines[1:] if line.split(",", 1)[0] in names]
    (nih / "Data_Entry_2017.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    size = json.loads((trained_run / "best.json").read_text())["shards"]["image"]["size"]
    assert size == 144
    shards = tmp_path / "shards"
    pack_dataset(nih, shards, PackSettings(split="random", size=size, shard_size=16), workers=2, progress=False)
    packed = {}
    for split, info in load_manifest(shards)["splits"].items():
        if info["samples"]:
            evaluate_run(trained_run, split=split, shards=str(shards), n_boot=0, out=tmp_path / split, progress=False, plots=False)
            table = read_predictions(tmp_path / split / "predictions.csv")
            packed.update(zip(table["keys"], table["probs"]))
    assert len(packed) == 70 and not predictions.failures
    labels = json.loads((trained_run / "best.json").read_text())["labels"]
    ours = {r["image"].rsplit("/", 1)[1][:-4]: np.array([r["probabilities"][k] for k in labels]) for r in predictions.records}
    assert ours.keys() == packed.keys()
    diff = max(float(np.abs(ours[k] - packed[k]).max()) for k in ours)
    assert diff < 1e-5, diff
    spread = np.std([v for v in ours.values()], axis=0).max()
    assert spread > 1e-3, "the images get different probabilities (a constant model would match trivially)"


def test_positive_findings_use_the_stored_thresholds(trained_run, predictions):
    thresholds = json.loads((trained_run / "best.json").read_text())["thresholds"]
    assert any(r["positive"] for r in predictions.records)
    for r in predictions.records:
        assert r["positive"] == [k for k, p in r["probabilities"].items() if p >= thresholds[k]]


def test_16bit_rgba_and_palette_files_match_the_8bit_original(trained_run, real_images, predictions, tmp_path):
    src = real_images[0]
    gray = load_gray8(src)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # full 16-bit range
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I") and Image.open(tmp_path / "palette.png").mode == "P"
    tinted = np.dstack([gray, (gray * 0.6).astype(np.uint8), (gray * 0.3).astype(np.uint8)])
    Image.fromarray(tinted, "RGB").save(tmp_path / "colour.jpg", quality=95)

    result = predict_files(trained_run, [tmp_path], progress=False)
    assert not result.failures
    by_name = {r["image"].rsplit("/", 1)[1]: r for r in result.records}
    original = next(r for r in predictions.records if r["image"].endswith(src.name))
    for name in ("sixteen.png", "rgba.png", "palette.png"):
        assert by_name[name]["probabilities"] == pytest.approx(original["probabilities"], abs=1e-6), name
        assert not any("colour" in w for w in by_name[name]["warnings"]), name
    assert any(w.startswith("colour image") for w in by_name["colour.jpg"]["warnings"])


def test_manifest_statistics_and_warnings_for_unlike_inputs(trained_run, eval_shards, predictions):
    """Packing recorded the training split's statistics (checked here against the shard images);
    real 1024 px X-rays are flagged as unlike the 160 px synthetic training images, synthetic test
    images are not."""
    from chexdist.data.shardformat import load_manifest

    shards = eval_shards
    manifest = load_manifest(shards)
    stats = manifest["image"]["stats"]["train"]
    best = json.loads((trained_run / "best.json").read_text())
    assert best["shards"]["image"]["stats"]["train"] == stats
    means, stds = [], []
    for entry in manifest["splits"]["train"]["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    a = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())), dtype=np.float64)
                    means.append(a.mean())
                    stds.append(a.std())
    assert stats["images"] == len(means) == manifest["splits"]["train"]["samples"]
    assert stats["mean"]["min"] == pytest.approx(min(means), abs=1e-3) and stats["std"]["max"] == pytest.approx(max(stds), abs=1e-3)
    assert stats["mean"]["median"] == pytest.approx(np.median(means), abs=1e-3)
    assert stats["short_side"]["min"] == stats["short_side"]["max"] == 160 and stats["aspect"]["max"] == 1.0

    assert all(any(w.startswith("shorter side (px) 1024") for w in r["warnings"]) for r in predictions.records)
    nih = eval_shards.parent / "nih"
    synthetic = sorted(nih.glob("images_*/images/*.png"))[-5:]
    assert all(not r["warnings"] for r in predict_files(trained_run, synthetic, progress=False).records)


def test_cli_formats_and_outputs(trained_run, real_images, predictions, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", "--run", str(trained_run), *map(str, real_images[:3]), "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == [str(p) for p in real_images[:3]]
    reference = {r["image"]: r for r in predictions.records}
    for row in rows:
        expected = reference[row["image"]]
        assert float(row["Effusion"]) == pytest.approx(expected["probabilities"]["Effusion"], abs=1e-6)
        assert row["positive"] == "|".join(expected["positive"])
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(trained_run), str(real_images[0]), "--cam", str(tmp_path / "cams"), "--finding", "Mass"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["failures"] == [] and len(payload["predictions"]) == 1
    assert payload["predictions"][0]["cam"] == [str(tmp_path / "cams" / f"{real_images[0].stem}_Mass.png")]
    assert Image.open(payload["predictions"][0]["cam"][0]).size == (128, 128)


def test_bad_files_in_a_batch_are_listed_and_the_rest_predicted(trained_run, real_images, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(real_images[0], folder / "good.png")
    (folder / "notes.png").write_text("not an image\n")
    data = real_images[1].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out.json"
    code = cli.main(["predict", "--run", str(trained_run), str(folder), str(tmp_path / "missing.png"), "--out", str(out), "--quiet"])
    assert code == 2
    payload = json.loads(out.read_text())
    assert [r["image"] for r in payload["predictions"]] == [str(folder / "good.png")]
    failed = sorted(f["image"].rsplit("/", 1)[1] for f in payload["failures"])
    assert failed == ["missing.png", "notes.png", "truncated.png"]
    err = capsys.readouterr().err
    for name in failed:
        assert sum(name in line for line in err.splitlines() if line.startswith("chexdist: error:")) == 1
    assert "3 input(s) failed" in err


def one_error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("chexdist: error:"), err
    return err[0]


def test_bad_runs_give_one_line_and_exit_2(trained_run, real_images, tmp_path, capsys):
    image = str(real_images[0])
    assert "no such run folder" in one_error_line(capsys, ["predict", "--run", str(tmp_path / "nope"), image])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "best.safetensors", bare / "best.safetensors")
    assert "no best.json" in one_error_line(capsys, ["predict", "--run", str(bare), image])
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(trained_run / "best.safetensors", swapped / "best.safetensors")
    info = json.loads((trained_run / "best.json").read_text())
    info["labels"][0], info["labels"][1] = info["labels"][1], info["labels"][0]
    (swapped / "best.json").write_text(json.dumps(info))
    assert "label order differs" in one_error_line(capsys, ["cam", "--run", str(swapped), image, "--out", str(tmp_path / "c")])
    assert "no images among" in one_error_line(capsys, ["predict", "--run", str(trained_run), str(tmp_path / "bare")])


def test_imported_checkpoint_predicts_without_packing_information(trained_run, real_images, tmp_path, capsys):
    """An imported checkpoint has no shards info: files skip the pack resize (the eval Resize alone
    scales them), thresholds are 0.5, and a note says inputs are not checked against training data."""
    from chexdist.runs import import_checkpoint

    imported = tmp_path / "imported"
    import_checkpoint(trained_run / "best.safetensors", "test_resnet", imported, image_size=128, eval_resize=144)
    out = tmp_path / "imported.json"
    assert cli.main(["predict", "--run", str(imported), *map(str, real_images[:4]), "--out", str(out)]) == 0
    assert "recorded no input statistics" in capsys.readouterr().err
    records = json.loads(out.read_text())["predictions"]
    assert [r["image"] for r in records] == [str(p) for p in real_images[:4]]
    from chexdist.evaluation.inference import load_run

    run = load_run(imported)
    with torch.no_grad():
        direct = torch.sigmoid(run.model(torch.stack([run.transform(load_gray8(p)) for p in real_images[:4]]))).numpy()
    for r, expected in zip(records, direct):
        assert r["positive"] == [k for k, p in r["probabilities"].items() if p >= 0.5] and r["warnings"] == []
        assert np.abs(np.array(list(r["probabilities"].values())) - expected).max() < 1e-5
