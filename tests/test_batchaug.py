"""Train augmentation per batch on the device (aug.where=device, chexdist.data.batchaug), on the CPU
here: bit-identical across a mid-epoch resume, keyed by (seed, epoch, rank, batch), each op checked
against torchvision (geometry, jitter, affine) or its documented parameter distributions, and a
short engine run that trains with it and resumes to the same batches and weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from chexdist.config import load_config
from chexdist.data.batchaug import RATIO, AugParams, BatchAugment, crop_boxes, resized_crop, resolve_where, train_stages
from chexdist.data.loader import build_train_loader
from chexdist.data.transforms import GrayToNormalizedRGB, device_load_size, load_transform, split_normalization
from chexdist.errors import ChexdistError
from tests.conftest import REPO
from tests.test_behaviour_training import ENV

S, EVAL_RESIZE, B = 32, 36, 8


def augment_for(preset: str, **kw) -> BatchAugment:
    args = dict(brightness=0.1, contrast=0.1, scale_min=0.5, degrees=10.0, translate=0.05, eval_resize=EVAL_RESIZE,
                input_size=0) | kw
    return BatchAugment(preset, S, args["eval_resize"], args["brightness"], args["contrast"], args["scale_min"],
                        args["degrees"], args["translate"], GrayToNormalizedRGB(), args["input_size"])


def loader_for(shards: Path, preset: str, *, start_batch: int = 0, seed: int = 3, epoch: int = 1, rank: int = 0,
               world: int = 1, workers: int = 0, source: int = 0):
    transform = load_transform(preset, S, EVAL_RESIZE, source_size=source)
    loader, _ = build_train_loader(shards, B, transform, workers, world, rank, seed=seed, epoch=epoch, shuffle_buffer=20,
                                   start_batch=start_batch, normalize_in_loader=False,
                                   batch_augment=augment_for(preset, input_size=source))
    return loader


def seen(loader) -> list[torch.Tensor]:
    """The batches the model would see, as the engine finishes them (index = batch number in the epoch)."""
    return [loader.finish(images, i) for i, (images, _) in enumerate(loader, start=loader.start_batch)]


def params(box, flip, brightness=1.0, contrast=1.0, brightness_first=True, angle=0.0, shift=(0.0, 0.0)) -> AugParams:
    n = len(box)
    return AugParams(torch.tensor(box), torch.tensor(flip), torch.full((n,), brightness), torch.full((n,), contrast),
                     torch.full((n,), brightness_first), torch.full((n,), angle), torch.tensor([shift] * n, dtype=torch.float64))


def smooth(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return ((torch.sin(xx / 5) + torch.cos(yy / 7)) * 60 + 128).clamp(0, 255).to(torch.uint8)[None, None]


@pytest.mark.parametrize("preset,workers,source", [("dannynet", 0, 0), ("strong", 2, 64), ("flip", 0, 64)])
def test_mid_epoch_resume_sees_bit_identical_batches(synth_shards, preset, workers, source):
    """source 64: the workers only decode the 64 px shards (resize a no-op) and the device resizes."""
    torch.manual_seed(11)
    full = seen(loader_for(synth_shards, preset, workers=workers, source=source))
    assert len(full) >= 6 and full[0].shape == (B, 3, S, S) and full[0].dtype == torch.float32
    torch.manual_seed(12345)
    torch.rand(777)  # a resumed process's global generator is anywhere
    k = 4
    resumed = seen(loader_for(synth_shards, preset, start_batch=k, workers=workers, source=source))
    assert len(resumed) == len(full) - k
    assert all(torch.equal(a, b) for a, b in zip(full[k:], resumed))
    assert not any(torch.equal(full[i], full[i + 1]) for i in range(len(full) - 1))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    seen(loader_for(synth_shards, preset, start_batch=len(full) - 1, source=source))
    assert torch.equal(before, torch.get_rng_state()), "the batch augmentation must not draw from the global generator"


def test_augmentation_is_a_function_of_seed_epoch_rank_and_batch(synth_shards):
    side = device_load_size("dannynet", S, EVAL_RESIZE, 0.5)
    images = torch.randint(0, 256, (B, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    base = loader_for(synth_shards, "dannynet")
    out = base.finish(images, 2)
    assert torch.equal(out, base.finish(images, 2))
    assert torch.equal(out, loader_for(synth_shards, "dannynet").finish(images, 2))
    others = {
        "batch": base.finish(images, 3),
        "seed": loader_for(synth_shards, "dannynet", seed=4).finish(images, 2),
        "rank": loader_for(synth_shards, "dannynet", rank=1, world=2).finish(images, 2),
        "epoch": loader_for(synth_shards, "dannynet", epoch=2).finish(images, 2),
    }
    for key, other in others.items():
        assert not torch.equal(out, other), f"changing the {key} must change the augmentation"
    base.set_epoch(2)
    assert torch.equal(base.finish(images, 2), others["epoch"])  # set_epoch re-keys it


def test_flip_and_full_crop_are_exact():
    x = torch.randint(0, 256, (2, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    identity_load = augment_for("dannynet", scale_min=1.0, eval_resize=S)  # load size = S: a full crop is the identity
    assert identity_load.load_size == S
    out = identity_load.augment(x, params([[0, 0, S, S]] * 2, [True, False]))
    assert torch.equal(out[0], x[0].flip(-1).float()) and torch.equal(out[1], x[1].float())
    flip = augment_for("flip", eval_resize=S)
    out = flip.augment(x, params([[0, 0, S, S]] * 2, [True, False]))
    assert torch.equal(out[0], x[0].flip(-1).float()) and torch.equal(out[1], x[1].float())


@pytest.mark.parametrize("preset", ["flip", "dannynet"])
def test_the_device_resize_is_torchvisions_resize(preset):
    """From the packed size (48) to the load size: torchvision's antialiased Resize of the float image
    to 1e-3 grey levels before rounding, within 1 level of its uint8 Resize (the workers' path); the
    flip preset then takes the eval centre crop, as torchvision's CenterCrop."""
    img = smooth(48)
    aug = augment_for(preset, input_size=48, brightness=0.0, contrast=0.0)
    L = aug.load_size
    assert L == (EVAL_RESIZE if preset == "flip" else 46)
    resized = torch.nn.functional.interpolate(img.float(), size=(L, L), mode="bilinear", antialias=True, align_corners=False)
    assert (resized[0] - v2.Resize(L, antialias=True)(img[0].float())).abs().max() < 1e-3
    assert (resized.round() - v2.Resize(L, antialias=True)(img[0]).float()).abs().max() <= 1
    out = aug.augment(img, params([[0, 0, L, L]], [False]))  # flip: no flip; dannynet: the whole image, no jitter
    assert out.shape == (1, 1, S, S)
    if preset == "flip":
        assert torch.equal(out[0], TF.center_crop(resized.round()[0], [S, S]))
    else:
        assert torch.equal(out, resized_crop(resized.round(), torch.tensor([[0, 0, L, L]]), torch.tensor([False]), S).round())


@pytest.mark.parametrize("box", [[5, 7, 20, 24], [3, 2, 40, 44], [0, 0, 48, 48]])
def test_resized_crop_matches_torchvision(box):
    """Against torchvision's resized_crop of the same box: the float resampling (antialias=False) to
    1e-3 grey levels inside the outer ring of output pixels; and within 3 levels everywhere of the
    uint8 antialiased crop the CPU path takes (antialias, uint8 rounding and that ring)."""
    img = smooth(48)
    for flip in (False, True):
        out = resized_crop(img.float(), torch.tensor([box]), torch.tensor([flip]), S)[0, 0]
        ref = TF.resized_crop(img[0].float(), *box, [S, S], antialias=False)[0]
        ref = ref.flip(-1) if flip else ref
        assert (out - ref)[1:-1, 1:-1].abs().max() < 1e-3
        cpu = TF.resized_crop(img[0], *box, [S, S], antialias=True)[0].float()
        cpu = cpu.flip(-1) if flip else cpu
        assert (out.round() - cpu).abs().max() <= 3


@pytest.mark.parametrize("brightness_first", [True, False])
def test_jitter_equals_torchvision_kernels_in_either_order(brightness_first):
    aug = augment_for("dannynet", scale_min=1.0, eval_resize=S, brightness=0.5, contrast=0.5)
    x = torch.randint(0, 256, (4, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = aug.augment(x, params([[0, 0, S, S]] * 4, [False] * 4, brightness=1.3, contrast=0.6,
                                brightness_first=brightness_first))

    def jitter(im):
        if brightness_first:
            return TF.adjust_contrast(TF.adjust_brightness(im, 1.3), 0.6)
        return TF.adjust_brightness(TF.adjust_contrast(im, 0.6), 1.3)

    assert torch.equal(out, torch.stack([jitter(im) for im in x]).float())


@pytest.mark.parametrize("angle,shift", [(90.0, (0.0, 0.0)), (17.0, (3.0, -2.0)), (-8.0, (-1.0, 1.0))])
def test_affine_equals_torchvision_affine(angle, shift):
    aug = augment_for("strong", scale_min=1.0, eval_resize=S, brightness=0.0, contrast=0.0, degrees=30.0, translate=0.1)
    x = torch.randint(0, 256, (3, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = aug.augment(x, params([[0, 0, S, S]] * 3, [False] * 3, angle=angle, shift=shift))
    ref = torch.stack([TF.affine(im, angle=angle, translate=[int(shift[0]), int(shift[1])], scale=1.0, shear=[0.0, 0.0],
                                 interpolation=InterpolationMode.NEAREST) for im in x]).float()
    assert (out != ref).float().mean() < 0.002  # nearest: a tie can round the other way
    if angle == 90.0:
        assert torch.equal(out, x.rot90(-1, (-2, -1)).float())  # affine turns clockwise


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_crop_parameters_follow_torchvision_random_resized_crop():
    """Area share, log aspect ratio and top offset against torchvision's own make_params: two-sample
    KS below its 0.1% critical value (1.95 * sqrt(2 / n)); the fallback box equals torchvision's."""
    n, side = 4000, 45
    ours = crop_boxes(n, side, side, (0.5, 1.0), RATIO, torch.Generator().manual_seed(0)).double().numpy()
    rrc = v2.RandomResizedCrop(S, scale=(0.5, 1.0))
    torch.manual_seed(0)
    theirs = np.array([[p["top"], p["left"], p["height"], p["width"]]
                       for p in (rrc.make_params([torch.zeros(1, side, side)]) for _ in range(n))], dtype=np.float64)
    critical = 1.95 * np.sqrt(2 / n)
    for name, stat in (("area", lambda b: b[:, 2] * b[:, 3]), ("log ratio", lambda b: np.log(b[:, 3] / b[:, 2])),
                       ("top", lambda b: b[:, 0])):
        assert ks(stat(ours), stat(theirs)) < critical, name
    fallback = v2.RandomResizedCrop(S, scale=(1.0, 1.0), ratio=(2.0, 3.0))  # never fits a square: central crop
    expected = fallback.make_params([torch.zeros(1, side, side)])
    got = crop_boxes(3, side, side, (1.0, 1.0), (2.0, 3.0), torch.Generator().manual_seed(1))
    assert got.tolist() == [[expected["top"], expected["left"], expected["height"], expected["width"]]] * 3


def test_jitter_ranges_and_order_follow_torchvision_color_jitter():
    aug = augment_for("dannynet", brightness=0.1, contrast=1.5)
    p = aug.sample(4000, torch.Generator().manual_seed(0))
    jitter = v2.ColorJitter(brightness=0.1, contrast=1.5)
    for ours, theirs in ((p.brightness, jitter.brightness), (p.contrast, jitter.contrast)):
        lo, hi = theirs
        assert lo <= float(ours.min()) and float(ours.max()) <= hi
        assert ks(ours.numpy(), np.random.default_rng(0).uniform(lo, hi, 4000)) < 1.95 * np.sqrt(2 / 4000)
    assert abs(float(p.brightness_first.double().mean()) - 0.5) < 0.03  # randperm: brightness before contrast half the time
    assert abs(float(p.flip.double().mean()) - 0.5) < 0.03
    assert float(p.angle.abs().max()) <= 10.0 and float(p.shift.abs().max()) <= round(0.05 * S)


def test_where_resolution_and_the_load_transform():
    assert resolve_where("auto", "cpu") == "workers" and resolve_where("auto", "cuda") == "device"
    assert resolve_where("device", "cpu") == "device"
    assert device_load_size("dannynet", 224, 256, 0.5) == 317 and device_load_size("flip", 224, 256, 0.5) == 256
    per_image, _ = split_normalization(load_transform("strong", S, EVAL_RESIZE))
    assert per_image(torch.zeros(1, 50, 70, dtype=torch.uint8)).shape == (1, 46, 46)
    packed = torch.randint(0, 256, (1, 64, 80), dtype=torch.uint8)  # a packed image: shorter side 64
    per_image, _ = split_normalization(load_transform("dannynet", S, EVAL_RESIZE, source_size=64))
    assert torch.equal(per_image(packed), packed[:, :, 8:72])  # no resampling: a centre crop only
    with pytest.raises(ChexdistError, match=r"expects uint8 batches \[B,1,64,64\]"):
        augment_for("dannynet", input_size=64)(torch.zeros(2, 1, 46, 46, dtype=torch.uint8), torch.Generator())


# fit() as train.py runs it, with a seam: a forward pre-hook saves every batch the model trains on.
FIT_SCRIPT = """
import sys, torch
import chexdist.training.engine as engine
from chexdist.config import load_config

out, resume, overrides = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
batches, built = [], engine.create_model

def create_model(*args, **kwargs):
    model = built(*args, **kwargs)
    model.register_forward_pre_hook(lambda m, inputs: batches.append(inputs[0].detach().clone()) if m.training else None)
    return model

engine.create_model = create_model
engine.fit(load_config("tiny", overrides=overrides), out, resume=resume, progress=False)
torch.save(batches, out + ("-resumed" if resume else "") + "-batches.pt")
"""


@pytest.mark.slow
def test_engine_trains_with_device_augmentation_and_resumes_exactly(train_shards, tmp_path):
    script = tmp_path / "fit_batches.py"
    script.write_text(FIT_SCRIPT)
    out = tmp_path / "run"
    sets = [f"data.shards={train_shards}", "aug.where=device", "aug.preset=dannynet", "train.epochs=1",
            "data.max_train_batches=4", "train.checkpoint_every=2", "train.deterministic=true", "eval.bootstrap=0"]

    def fit(resume: str = "") -> None:
        done = subprocess.run([sys.executable, str(script), str(out), resume, *sets], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    fit()
    final = load_file(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors")
    best = json.loads((out / "best.json").read_text())
    assert best["aug_where"] == "device" and best["config"]["aug"]["where"] == "device"
    fit(str(out / "checkpoints" / "step000000002-epoch0000-batch000002"))
    full, resumed = torch.load(f"{out}-batches.pt"), torch.load(f"{out}-resumed-batches.pt")
    assert len(full) == 4 and len(resumed) == 2 and full[0].shape == (16, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    cfg = load_config("tiny", overrides=sets)  # the same batches built here: the engine passes batch k to finish
    transform, augment = train_stages(cfg, best["normalization"], on_device=True, source_size=72)  # shards at 72 px
    loader, _ = build_train_loader(train_shards, 16, transform, 0, 1, 0, seed=cfg.train.seed, epoch=0, max_batches=4,
                                   shuffle_buffer=cfg.data.shuffle_buffer, normalize_in_loader=False, batch_augment=augment)
    assert all(torch.equal(a, b) for a, b in zip(full, seen(loader)))
    after = load_file(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert all(torch.equal(final[k], after[k]) for k in final)
