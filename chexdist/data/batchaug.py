"""Train augmentation per batch on the training device (`aug.where: device`, or `auto` on CUDA).

The workers then only read and decode (`chexdist.data.transforms.load_transform`: Resize +
CenterCrop to a square W, the shards' packed size in training, so the resize is a no-op and batches
stack); :class:`BatchAugment` turns the uint8 batch [B,1,W,W] on the device into the normalized
float batch [B,3,S,S] the model sees, with the preset's ops in torchvision's order and with
torchvision's parameter distributions:

- a resize of the batch to the load size L (`device_load_size`; antialiased bilinear, as
  torchvision's Resize), rounded to integer grey levels as the uint8 path is;
- flip / none: the eval centre crop, then (flip) a per-sample horizontal flip, exact;
- RandomResizedCrop + RandomHorizontalFlip as one affine map per sample: one ``F.affine_grid`` +
  ``F.grid_sample`` (bilinear, border padding) for the whole batch, rounded. Unlike the CPU path it
  does not antialias: a crop larger than S is resampled with plain bilinear weights (the load size
  keeps that shrink at most 1 / sqrt(scale_min), 1.41x by default);
- ColorJitter(brightness, contrast): per-sample factors and a per-sample order of the two ops,
  each op clamped and truncated to integer levels as torchvision's uint8 kernels are;
- RandomAffine(degrees, translate) (preset `strong`): a second grid_sample, nearest, zero fill,
  after the jitter as on the CPU;
- the model's normalization (`GrayToNormalizedRGB`), last.

Parameters are drawn on the CPU from the `torch.Generator` the caller passes (the train loader seeds
one per batch from (seed, epoch, rank, batch index): `ShardLoader.finish`), never from a global
generator, so a batch's augmentation depends on those numbers alone and a mid-epoch resume
reproduces it bit for bit (on the same device type; CUDA's kernels are not bitwise the CPU's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chexdist.data.transforms import GrayToNormalizedRGB, device_load_size, split_normalization, train_transform
from chexdist.errors import ChexdistError

AUG_WHERE: tuple[str, ...] = ("auto", "workers", "device")
TRIES = 10  # torchvision RandomResizedCrop's attempts before its fallback to a central crop
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default aspect-ratio range
CROP_PRESETS = ("dannynet", "strong")


def resolve_where(where: str, device: torch.device | str) -> str:
    """'device' or 'workers': auto means device when the training device is CUDA."""
    if where not in AUG_WHERE:
        raise ChexdistError(f"aug.where must be one of {', '.join(AUG_WHERE)}, got {where!r}")
    if where == "auto":
        return "device" if torch.device(device).type == "cuda" else "workers"
    return where


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
    """[n,4] int64 (top, left, height, width): torchvision RandomResizedCrop.make_params for n samples.

    Each sample gets TRIES candidate (area, log-ratio) draws; the first that fits is kept, as
    torchvision keeps the first of its sequential tries, so the distribution is the same; none
    fitting falls back to torchvision's central crop. The arithmetic is torchvision's (float32
    draws and exp, float64 sizes, round half to even), in NumPy: torch's kernels on these small
    arrays cost milliseconds when its intra-op thread pool is busy (measured on 2 loaded cores)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    target = area * torch.empty(n, TRIES).uniform_(scale[0], scale[1], generator=generator).numpy().astype(np.float64)
    draws = torch.empty(n, TRIES).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
    aspect = np.exp(draws.numpy()).astype(np.float64)
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found, first = fits.any(axis=1), fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    where = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
    top = np.where(found, np.floor(where[:, 0] * (height - h + 1)), (height - fh) // 2)
    left = np.where(found, np.floor(where[:, 1] * (width - w + 1)), (width - fw) // 2)
    return torch.from_numpy(np.stack([top, left, h, w], axis=1).astype(np.int64))


def jitter_range(value: float) -> tuple[float, float]:
    """ColorJitter's factor range for brightness or contrast `value`: [max(0, 1 - value), 1 + value]."""
    return max(0.0, 1.0 - value), 1.0 + value


@dataclass
class AugParams:
    """One batch's random parameters (CPU tensors, one row per sample)."""

    box: torch.Tensor  # [B,4] int64 top, left, height, width in load_size pixels
    flip: torch.Tensor  # [B] bool
    brightness: torch.Tensor  # [B] float32 factor (1 = off)
    contrast: torch.Tensor  # [B] float32 factor (1 = off)
    brightness_first: torch.Tensor  # [B] bool: ColorJitter's random op order
    angle: torch.Tensor  # [B] float32 degrees, clockwise (torchvision affine)
    shift: torch.Tensor  # [B,2] float64 integer pixels (tx, ty)


def crop_theta(box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """[B,2,3] affine_grid matrices (align_corners=False) that resample box (top, left, h, w) of a
    size x size image to the output, mirrored where `flip`: output x in [-1, 1] -> input
    x = (w / size) * (+-x) + (2 * left + w) / size - 1, likewise y."""
    top, left, h, w = box.double().unbind(1)
    sign = 1.0 - 2.0 * flip.double()
    zero = torch.zeros_like(w)
    rows = [torch.stack([sign * w / size, zero, (2 * left + w) / size - 1], 1),
            torch.stack([zero, h / size, (2 * top + h) / size - 1], 1)]
    return torch.stack(rows, 1).float()


def resized_crop(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """float [B,C,L,L] -> [B,C,size,size]: each sample's box resampled (bilinear, no antialias) and
    mirrored where `flip`, in one grid_sample. Inside the box's outer ring of output pixels this is
    torchvision's resized_crop(antialias=False) of the float image; that ring samples the pixels just
    outside the box where torchvision repeats the box's edge."""
    theta = crop_theta(box, flip, x.shape[-1]).to(x.device)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def affine_theta(angle: torch.Tensor, shift: torch.Tensor, size: int) -> torch.Tensor:
    """[B,2,3] affine_grid matrices of torchvision's RandomAffine(angle, translate=shift) on a square
    image (scale 1, no shear, about the centre): its inverse matrix in normalized coordinates."""
    rot = torch.deg2rad(angle.double())
    cos, sin = torch.cos(rot), torch.sin(rot)
    tx, ty = shift.double().unbind(1)
    m2 = -cos * tx - sin * ty
    m5 = sin * tx - cos * ty
    rows = [torch.stack([cos, sin, 2 * m2 / size], 1), torch.stack([-sin, cos, 2 * m5 / size], 1)]
    return torch.stack(rows, 1).float()


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(factor).clamp_(0, 255).floor_()


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (x * factor + mean * (1.0 - factor)).clamp_(0, 255).floor_()


class BatchAugment(nn.Module):
    """uint8 [B,1,W,W] (W = `input_size`, default `load_size`) -> normalized float [B,3,S,S],
    augmented per `preset` with parameters drawn from the generator passed to forward (on the CPU;
    applied on the input's device). The batch is first resized to `load_size` (antialiased, as
    torchvision's Resize) when W differs."""

    def __init__(self, preset: str, image_size: int, eval_resize: int, brightness: float, contrast: float,
                 scale_min: float, degrees: float, translate: float, normalize: GrayToNormalizedRGB, input_size: int = 0):
        super().__init__()
        self.preset, self.image_size, self.eval_resize = preset, image_size, eval_resize
        self.load_size = device_load_size(preset, image_size, eval_resize, scale_min)
        self.input_size = input_size or self.load_size
        self.brightness, self.contrast = jitter_range(brightness), jitter_range(contrast)
        self.jitter = preset in CROP_PRESETS and bool(brightness or contrast)
        self.scale, self.degrees, self.translate = (scale_min, 1.0), degrees, translate
        self.affine = preset == "strong" and bool(degrees or translate)
        self.normalize = normalize

    def sample(self, n: int, generator: torch.Generator) -> AugParams:
        """n samples' parameters, always the same draws in the same order whatever the preset."""
        L, S = self.load_size, self.image_size
        box = crop_boxes(n, L, L, self.scale, RATIO, generator)
        flip = torch.rand(n, generator=generator) < 0.5
        brightness = torch.empty(n).uniform_(*self.brightness, generator=generator)
        contrast = torch.empty(n).uniform_(*self.contrast, generator=generator)
        brightness_first = torch.rand(n, generator=generator) < 0.5
        angle = torch.empty(n).uniform_(-self.degrees, self.degrees, generator=generator)
        most = self.translate * S
        shift = torch.round(torch.empty(n, 2).uniform_(-most, most, generator=generator).double())
        return AugParams(box, flip, brightness, contrast, brightness_first, angle, shift)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        W = self.input_size
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (W, W):
            raise ChexdistError(f"batch augmentation expects uint8 batches [B,1,{W},{W}] from the workers "
                                f"(load_transform), got shape {tuple(images.shape)}")
        return self.normalize(self.augment(images, self.sample(images.shape[0], generator)))

    def augment(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        """The augmented batch as float grey levels [B,1,S,S] (integer-valued, 0..255), before normalization."""
        x, device, L, S = images.to(torch.float32), images.device, self.load_size, self.image_size
        if x.shape[-1] != L:
            x = F.interpolate(x, size=(L, L), mode="bilinear", antialias=True, align_corners=False).round_()
        if self.preset not in CROP_PRESETS:  # the eval geometry's centre crop, then flip's flip
            top = int(round((L - S) / 2.0))  # torchvision center_crop's offset
            x = x[..., top:top + S, top:top + S]
            if self.preset == "flip":
                x = torch.where(params.flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
            return x
        B = x.shape[0]
        x = resized_crop(x, params.box, params.flip, S).round_()
        if self.jitter:
            b = params.brightness.to(device).view(-1, 1, 1, 1)
            c = params.contrast.to(device).view(-1, 1, 1, 1)
            first = params.brightness_first.to(device).view(-1, 1, 1, 1)
            x = torch.where(first, _brightness(x, b), _contrast(x, c))
            x = torch.where(first, _contrast(x, c), _brightness(x, b))
        if self.affine:
            grid = F.affine_grid(affine_theta(params.angle, params.shift, S).to(device), [B, 1, S, S], align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return x


def build_batch_augment(aug, image_size: int, eval_resize: int, normalize: GrayToNormalizedRGB,
                        input_size: int = 0) -> BatchAugment:
    """The BatchAugment of an `aug` config section (AugConfig) for batches of `input_size` px."""
    return BatchAugment(aug.preset, image_size, eval_resize, aug.brightness, aug.contrast, aug.scale_min,
                        aug.degrees, aug.translate, normalize, input_size)


def train_stages(config, normalization: dict | None, on_device: bool, source_size: int = 0) -> tuple[nn.Module, BatchAugment | None]:
    """(the train loader's per-image transform, the batch augmentation or None) of a run's Config:
    with `on_device`, workers that decode and resize to `source_size` (the shards' packed size;
    0 = `load_size`) and the BatchAugment that takes it from there."""
    transform = train_transform(config, normalization, on_device, source_size)
    if not on_device:
        return transform, None
    data = config.data
    return transform, build_batch_augment(config.aug, data.image_size, data.resolved_eval_resize,
                                          split_normalization(transform)[1], source_size)


def generator_for(words) -> torch.Generator:
    """A CPU generator seeded from four 32-bit words (`chexdist.data.loader.seed_words`)."""
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
