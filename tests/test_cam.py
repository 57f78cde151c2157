"""Grad-CAM: agreement with a hand computation, target layers per architecture, box geometry through
resize and crop, the pointing game on synthetic motifs with their BBox list, overlays from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chexdist.cli import main as cli
from chexdist.evaluation.cam import GradCam, box_iou, clip_box, localize, map_box, peak_point
from chexdist.errors import ChexdistError
from chexdist.data.images import encode
from chexdist.evaluation.inputs import InputPipeline
from chexdist.evaluation.metrics import bootstrap_mean_ci
from chexdist.models.factory import create_model
from chexdist.data.nih import read_image_list
from chexdist.data.transforms import build_transform


def hand_gradcam(features: torch.nn.Module, head, x: torch.Tensor, cls: int) -> np.ndarray:
    """Grad-CAM from its definition: ReLU(sum_k mean(dy/dA_k) A_k), min-max scaled."""
    a = features(x).detach().requires_grad_(True)
    y = head(a)[:, cls].sum()
    (grad,) = torch.autograd.grad(y, a)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1)).detach().numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def test_densenet_gradcam_equals_hand_computation():
    torch.manual_seed(0)
    model = create_model("densenet121").eval()
    x = torch.randn(2, 3, 96, 96)
    with GradCam(model) as cam:
        maps, logits = cam(x, [2, 5])
    assert cam.layer_name == "relu(features)" and maps.shape == (2, 3, 3)
    torch.testing.assert_close(logits, model(x).detach())
    # torchvision's DenseNet pools ReLU(features): that post-ReLU map is the one explained.
    features = lambda t: torch.relu(model.features(t))  # noqa: E731
    head = lambda a: model.classifier(a.mean(dim=(2, 3)))  # noqa: E731
    expected = np.concatenate([hand_gradcam(features, head, x[i : i + 1], c) for i, c in enumerate([2, 5])])
    np.testing.assert_allclose(maps, expected, atol=1e-4)  # pytorch-grad-cam adds 1e-7 when scaling
    assert not any(m._forward_hooks for m in model.modules()), "hooks are removed when the context closes"


@pytest.mark.parametrize(("arch", "size", "layer", "grid"), [
    ("test_resnet", 128, "layer4", (4, 4)),
    ("test_efficientnet", 128, "bn2", (4, 4)),
    ("test_vit", 160, "blocks.5.norm1", (10, 10)),
])
def test_target_layers_and_grids(arch, size, layer, grid):
    torch.manual_seed(0)
    model = create_model(arch).eval()
    with GradCam(model) as cam:
        maps, _ = cam(torch.randn(6, 3, size, size), range(6))
    assert cam.layer_name == layer and maps.shape == (6, *grid)
    peaks = maps.max(axis=(1, 2))
    # Min-max scaled; an untrained model may explain some classes with an all-zero map, never all.
    assert (np.isclose(peaks, 1.0, atol=1e-5) | (peaks == 0)).all() and (peaks > 0).sum() >= 2


def test_geometry_boxes_land_on_their_pixels(tmp_path):
    """A bright rectangle in a 300x200 file, packed at 150, Resize 112, CenterCrop 96: its mapped box
    covers exactly the bright pixels of the model's crop (within the resampling blur)."""
    img = np.full((300, 200), 40, np.uint8)
    x, y, w, h = 120, 90, 50, 80
    img[y : y + h, x : x + w] = 220
    info = {"shards": {"image": {"size": 150, "format": "png"}}}
    pipeline = InputPipeline(info, build_transform("none", image_size=96, eval_resize=112, train=False))
    path = tmp_path / "rect.png"
    path.write_bytes(encode(img))
    prepared = pipeline(path)
    g = prepared.geometry
    assert g.original == (300, 200) and g.resized == (168, 112) and g.crop == (96, 96) and (g.top, g.left) == (36, 8)
    box = g.to_input(x, y, w, h)
    bright = np.argwhere(prepared.crop > 130)
    (y0, x0), (y1, x1) = bright.min(axis=0), bright.max(axis=0) + 1
    assert np.allclose(box, (x0, y0, x1, y1), atol=1.0), (box, (x0, y0, x1, y1))
    assert clip_box(g.to_input(0, 0, 200, 20), (96, 96)) is None, "a box the crop removes entirely"
    assert clip_box(g.to_input(0, 60, 200, 40), (96, 96)) == pytest.approx((0, 0, 96, 20))


def test_peak_box_and_iou_helpers():
    grid = np.zeros((4, 4), np.float32)
    grid[0, 0] = 1.0
    assert peak_point(grid, (128, 128)) == (16.0, 16.0), "centre of the strongest cell, not a plateau corner"
    assert peak_point(np.zeros((4, 4)), (128, 128)) is None
    heat = np.zeros((10, 10))
    heat[2:5, 3:7] = 1.0
    heat[8, 8] = 0.9  # a separate region above threshold is not part of the peak's box
    assert map_box(heat, 0.5) == (3, 2, 7, 5)
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7) and box_iou((0, 0, 1, 1), None) == 0.0


def test_bootstrap_mean_ci_resamples_patients():
    rng = np.random.default_rng(1)
    values = rng.random(40) < 0.6
    base = bootstrap_mean_ci(values, np.arange(40), n_boot=2000, seed=3)
    # Each patient with two identical images: resampling patients gives exactly the same means.
    twice = bootstrap_mean_ci(np.repeat(values, 2), np.repeat(np.arange(40), 2), n_boot=2000, seed=3)
    assert twice["ci"] == base["ci"] and twice["value"] == base["value"] == pytest.approx(values.mean())
    per_image = bootstrap_mean_ci(np.repeat(values, 2), np.arange(80), n_boot=2000, seed=3)
    assert per_image["ci"][1] - per_image["ci"][0] < 0.8 * (base["ci"][1] - base["ci"][0])
    from scipy.stats import bootstrap

    ref = bootstrap((values.astype(float),), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert base["ci"] == pytest.approx([ref.low, ref.high], abs=0.03)
    assert bootstrap_mean_ci([], [], n_boot=10)["value"] is None


def test_pointing_game_on_held_out_synthetic_images(trained_run, eval_shards, tmp_path):
    """Held-out (test list) synthetic images with their motif boxes: the Grad-CAM peak lands in the
    finding's box far more often than a random point would."""
    nih = eval_shards.parent / "nih"
    test_names = set(read_image_list(nih / "test_list.txt"))
    images = [p for p in sorted(nih.glob("images_*/images/*.png")) if p.name in test_names]
    report = localize(trained_run, images, nih / "BBox_List_2017.csv", n_boot=300)
    json.dumps(report, allow_nan=False)
    overall = report["overall"]
    assert report["resampled"] == "patients" and report["target_layer"] == "layer4"
    assert overall["boxes"] >= 60 and report["boxes_outside_crop"] == 0
    assert 0.05 < overall["chance_hit_rate"] < 0.12
    assert overall["pointing_hit_rate"] >= 0.5 and overall["pointing_ci"][0] > 4 * overall["chance_hit_rate"]
    assert overall["iou_mean"] > 0.2 and overall["iou_at_least"]["0.1"] > 0.5
    for r in report["records"]:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and r["visible_fraction"] == pytest.approx(1.0)
    scored = sum(s["boxes"] for s in report["per_finding"].values())
    assert scored == overall["boxes"] == len(report["records"])


def test_cam_cli_overlays_and_localization_report(trained_run, eval_shards, tmp_path, capsys):
    nih = eval_shards.parent / "nih"
    images = sorted(nih.glob("images_*/images/*.png"))[:4]
    out = tmp_path / "cams"
    assert cli.main(["cam", "--run", str(trained_run), *map(str, images), "--out", str(out), "--quiet"]) == 0
    from chexdist.evaluation.predict import predict_files

    reference = predict_files(trained_run, images, progress=False, cam_dir=tmp_path / "ref").records
    expected = {p.rsplit("/", 1)[1] for r in reference for p in r["cam"]}
    for r in reference:  # every positive finding is drawn, or reported as having no evidence
        assert sorted(r["positive"]) == sorted([p.rsplit("_", 1)[1][:-4] for p in r["cam"]] + r["cam_empty"])
    assert {p.name for p in out.iterdir()} == expected and expected
    printed = capsys.readouterr().out
    assert all(f"{f}: no positive evidence at the target layer" in printed for r in reference for f in r["cam_empty"])
    overlay = Image.open(next(out.iterdir()))
    assert overlay.mode == "RGB" and overlay.size == (128, 128)

    forced = tmp_path / "forced"
    assert cli.main(["cam", "--run", str(trained_run), *map(str, images), "--out", str(forced), "--finding", "Infiltrate", "--quiet"]) == 0
    drawn = predict_files(trained_run, images, progress=False, cam_dir=tmp_path / "ref2", cam_finding="Infiltration").records
    assert sorted(p.name for p in forced.iterdir()) == sorted(p.rsplit("/", 1)[1] for r in drawn for p in r["cam"])

    loc = tmp_path / "loc"
    code = cli.main(["cam", "--run", str(trained_run), str(nih / "images_001" / "images"), "--out", str(loc),
                     "--localize", str(nih / "BBox_List_2017.csv"),
                     "--bootstrap", "50", "--quiet"])
    assert code == 0
    report = json.loads((loc / "localization.json").read_text())
    lines = (loc / "localization_boxes.csv").read_text().splitlines()
    assert report["boxes_scored"] == len(lines) - 1 == sum(1 for p in loc.glob("*.png"))
    assert "pointing [95% CI]" in capsys.readouterr().out
    with pytest.raises(ChexdistError, match="unknown finding 'Nope'"):
        predict_files(trained_run, images, cam_dir=tmp_path / "x", cam_finding="Nope")


def test_boxes_the_crop_removes_are_counted_not_scored(trained_run, eval_shards, tmp_path):
    """A box inside the 8 px border that the 144 -> 128 center crop cuts away is counted as outside
    the crop; a box in the files' own pixels (box_frame=0) is scaled by nothing; other file names than
    NIH's are resampled per image."""
    import pandas as pd

    source = sorted((eval_shards.parent / "nih").glob("images_*/images/*.png"))[0]
    image = tmp_path / "case-a.png"
    image.write_bytes(source.read_bytes())
    boxes = pd.DataFrame({"image": [image.name, image.name], "label": ["Effusion", "Mass"],
                          "x": [0.0, 40.0], "y": [0.0, 50.0], "w": [6.0, 80.0], "h": [150.0, 60.0]})
    report = localize(trained_run, [image], boxes, box_frame=0, n_boot=20)
    assert report["boxes_outside_crop"] == 1 and report["boxes_scored"] == 1 and report["resampled"] == "images"
    (record,) = report["records"]
    scale = 144 / 160  # 160 px file packed at 144; Resize(144) keeps it; crop offset (144 - 128) / 2 = 8
    expected = [40 * scale - 8, 50 * scale - 8, 120 * scale - 8, 110 * scale - 8]
    assert record["finding"] == "Mass" and record["box"] == pytest.approx(expected, abs=1e-3)
    assert report["per_finding"]["Effusion"]["boxes"] == 0 and report["per_finding"]["Effusion"]["pointing_hit_rate"] is None


def test_evaluate_localize_scores_only_the_evaluated_splits_images(trained_run, eval_shards, tmp_path):
    """`chexdist evaluate --localize` scores Grad-CAM on the boxes of the scored split's own images:
    every box of a test image is scored or counted outside the crop, and no box of another split is."""
    import csv

    from chexdist.data.nih import BBOX_FINDINGS
    from chexdist.data.nih import read_bbox_list

    nih = eval_shards.parent / "nih"
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--run", str(trained_run), "--out", str(out), "--bootstrap", "20", "--no-plots",
                     "--no-progress", "--localize", str(nih / "BBox_List_2017.csv"), "--images", str(nih)])
    assert code == 0
    with open(out / "predictions.csv", newline="") as f:
        test_keys = {row["image"] for row in csv.DictReader(f)}
    boxes = read_bbox_list(nih / "BBox_List_2017.csv")
    boxes = boxes[boxes["label"].isin(BBOX_FINDINGS)]
    on_test = boxes["image"].map(lambda name: name.rsplit(".", 1)[0]).isin(test_keys)
    report = json.loads((out / "localization" / "localization.json").read_text())
    assert 0 < on_test.sum() < len(boxes)
    assert report["boxes_scored"] + report["boxes_outside_crop"] == on_test.sum()
