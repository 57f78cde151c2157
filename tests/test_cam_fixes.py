"""Grad-CAM fixes: no hooks left on the model between calls (the long-running server's leak), maps
scaled to [0, 1] again after upsampling, and an all-zero map reported instead of drawn."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from chexdist.evaluation.cam import GradCam, is_empty, overlay_png, upsample, write_overlays
from chexdist.evaluation.inputs import Geometry, Prepared
from chexdist.models.factory import create_model


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hooks_stay_on_the_model_between_calls():
    torch.manual_seed(0)
    model = create_model("test_resnet").eval()
    explainer = GradCam(model)
    for _ in range(3):
        maps, _ = explainer(torch.randn(2, 3, 64, 64), [0, 1])
        assert maps.shape == (2, 2, 2)
        assert hooks(model) == 0, "every call's CAM hooks are released when it returns"


def test_upsampled_map_spans_zero_to_one():
    grid = np.zeros((1, 4, 4), dtype=np.float32)
    grid[0, 1, 2], grid[0, 3, 0] = 1.0, 0.4
    heat = upsample(grid, (128, 128))
    assert heat.shape == (1, 128, 128)
    assert heat.max() == 1.0 and heat.min() == 0.0
    iy, ix = np.unravel_index(int(np.argmax(heat[0])), heat[0].shape)
    assert 32 <= iy < 64 and 64 <= ix < 96, "the peak stays in its grid cell"
    assert not upsample(np.zeros((1, 4, 4), np.float32), (32, 32)).any(), "an all-zero map stays zero"


def test_all_zero_map_is_reported_not_drawn(tmp_path):
    """With global pooling and a linear head, a class whose weights are all negative gets no positive
    evidence (ReLU of a negative combination of non-negative activations): no overlay is written."""
    torch.manual_seed(0)
    model = create_model("test_resnet").eval()
    with torch.no_grad():
        model.get_classifier().weight[0] = -model.get_classifier().weight[0].abs()
        model.get_classifier().weight[1] = model.get_classifier().weight[1].abs()
    x = torch.randn(1, 3, 64, 64)
    crop = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    prepared = Prepared(tmp_path / "img.png", x[0], crop, Geometry((64, 64), (64, 64), (64, 64), 0, 0), {}, False)
    with GradCam(model) as explainer:
        maps, _ = explainer(x.repeat(2, 1, 1, 1), [0, 1])
        assert is_empty(maps[0]) and not is_empty(maps[1])
        written = write_overlays(explainer, [(prepared, 0), (prepared, 1)], tmp_path, batch_size=2)
    assert written[0] is None and written[1] == tmp_path / "img_Cardiomegaly.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_Cardiomegaly.png"]
    plain = np.asarray(Image.open(io.BytesIO(overlay_png(crop, np.zeros((64, 64), np.float32)))))
    assert (plain == crop[..., None]).all(), "an empty map drawn anyway (localize) is the plain crop, not a tint"
