"""Augmentation presets and the eval transform: shapes, normalization, replication, randomness, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chexdist.errors import ChexdistError
from chexdist.data.transforms import PRESETS, build_transform, split_normalization
from chexdist.models.arch import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def gray(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def to_gray(out: torch.Tensor) -> torch.Tensor:
    """Undo normalization per channel; replicated gray gives three equal planes."""
    return out * STD + MEAN


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_every_preset_gives_normalized_rgb(preset, train):
    transform = build_transform(preset, image_size=32, eval_resize=40, train=train)
    image = gray()
    for form in (image, torch.from_numpy(image), torch.from_numpy(image)[None], image[..., None]):
        out = transform(form)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        planes = to_gray(out)
        assert torch.allclose(planes[0], planes[1], atol=1e-5) and torch.allclose(planes[0], planes[2], atol=1e-5)
        assert planes.min() >= -1e-5 and planes.max() <= 1 + 1e-5


def test_eval_is_resize_then_center_crop_then_normalize():
    image = gray(50, 70)
    out = build_transform("dannynet", image_size=32, eval_resize=40, train=False)(image)
    resized = F.interpolate(torch.from_numpy(image)[None, None].float(), size=(40, 56), mode="bilinear", antialias=True)
    crop = resized[0, :, 4:36, 12:44].round().clamp(0, 255) / 255
    assert torch.allclose(to_gray(out)[:1], crop, atol=1.5 / 255)
    assert torch.equal(out, build_transform("none", image_size=32, eval_resize=40)(image))


def test_normalization_constants():
    flat = np.full((40, 40), 255, dtype=np.uint8)
    out = build_transform("none", image_size=32, eval_resize=32, train=False)(flat)
    assert torch.allclose(out[:, 0, 0], (1 - MEAN.flatten()) / STD.flatten(), atol=1e-5)
    assert NORMALIZATION == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def test_flip_preset_is_eval_geometry_plus_flip():
    image = gray(48, 48)
    eval_out = build_transform("none", image_size=32, eval_resize=40, train=False)(image)
    flip = build_transform("flip", image_size=32, eval_resize=40)
    torch.manual_seed(0)
    outs = [flip(image) for _ in range(16)]
    assert all(torch.equal(o, eval_out) or torch.equal(o, eval_out.flip(-1)) for o in outs)
    assert any(torch.equal(o, eval_out) for o in outs) and any(torch.equal(o, eval_out.flip(-1)) for o in outs)


@pytest.mark.parametrize("preset", ["dannynet", "strong"])
def test_random_presets_follow_the_torch_rng(preset):
    transform = build_transform(preset, image_size=32)
    image = gray()
    torch.manual_seed(3)
    first = [transform(image) for _ in range(3)]
    torch.manual_seed(3)
    again = [transform(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_colour_jitter_can_be_turned_off():
    image = gray()
    plain = build_transform("dannynet", image_size=32, brightness=0, contrast=0)
    jitter = build_transform("dannynet", image_size=32, brightness=0.5, contrast=0.5)
    torch.manual_seed(1)
    a = plain(image)
    torch.manual_seed(1)
    b = jitter(image)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert not any("ColorJitter" in type(t).__name__ for t in plain.transforms)


def test_transforms_pickle():
    for preset in PRESETS:
        transform = build_transform(preset, image_size=16, eval_resize=20, train=False)
        clone = pickle.loads(pickle.dumps(transform))
        assert torch.equal(clone(gray()), transform(gray()))


def test_bad_arguments_are_refused():
    with pytest.raises(ChexdistError, match="none, flip, dannynet, strong"):
        build_transform("heavy")
    with pytest.raises(ChexdistError, match="eval_resize"):
        build_transform("none", image_size=224, eval_resize=200)
    with pytest.raises(ChexdistError, match="scale_min"):
        build_transform("dannynet", scale_min=0)
    with pytest.raises(ChexdistError, match="translate"):
        build_transform("strong", translate=1.5)
    with pytest.raises(ChexdistError, match="uint8"):
        build_transform("none")(np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(ChexdistError, match="one gray channel"):
        build_transform("none")(torch.zeros((3, 40, 40), dtype=torch.uint8))


def test_normalization_splits_off_for_batches_on_the_device():
    transform = build_transform("none", image_size=32, eval_resize=40, train=False)
    per_image, normalize = split_normalization(transform)
    images = [gray(seed=i) for i in range(3)]
    gray_batch = torch.stack([per_image(x) for x in images])
    assert gray_batch.dtype == torch.uint8 and gray_batch.shape == (3, 1, 32, 32)
    assert torch.allclose(normalize(gray_batch), torch.stack([transform(x) for x in images]), atol=1e-6)
    with pytest.raises(ChexdistError, match="normalization"):
        split_normalization(per_image)


def test_normalization_follows_its_input_device():
    _, normalize = split_normalization(build_transform("none", image_size=8, eval_resize=8, train=False))
    batch = torch.zeros((2, 1, 8, 8), dtype=torch.uint8, device="meta")
    assert normalize(batch).device.type == "meta" and normalize.shift.device.type == "meta"
