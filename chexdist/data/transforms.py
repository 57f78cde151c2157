"""Named augmentation presets and the eval transform (torchvision.transforms.v2).

Input: one 8-bit grayscale image, a numpy HxW array or a uint8 tensor [1,H,W] (or [H,W]).
Output: float32 [3,H,W], normalized with the model's mean/std (`models.arch.resolve_normalization`;
ImageNet's by default), the gray channel replicated to 3 channels.

Every geometric and colour op runs on the 1-channel uint8 tensor (a third of the work of RGB and
uint8 fast paths for resize); conversion to float, normalization and the replication happen last, in
one broadcasted multiply-add. All pieces are picklable modules, so DataLoader workers can use them
under fork or spawn.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from chexdist.config import AugConfig, Config
from chexdist.errors import ChexdistError
from chexdist.models.arch import IMAGENET_MEAN, IMAGENET_STD, resolve_normalization

_AUG = AugConfig()  # the augmentation defaults live in the config, once

PRESETS: tuple[str, ...] = ("none", "flip", "dannynet", "strong")
PRESET_HELP = {
    "none": "no augmentation: the eval transform (Resize(eval_resize) + CenterCrop(image_size))",
    "flip": "CheXNet: the eval geometry + RandomHorizontalFlip",
    "dannynet": "RandomResizedCrop(image_size) + RandomHorizontalFlip + ColorJitter(brightness, contrast)",
    "strong": "dannynet + RandomAffine(degrees, translate)",
}


class ToGrayTensor(nn.Module):
    """Accept numpy HxW / HxWx1 or tensor [H,W] / [1,H,W] uint8 and return a uint8 tensor [1,H,W]."""

    def forward(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.array(image) if not image.flags.writeable else np.ascontiguousarray(image))
        if not isinstance(image, torch.Tensor):
            raise ChexdistError(f"transform input must be a numpy array or tensor, got {type(image).__name__}")
        if image.dtype != torch.uint8:
            raise ChexdistError(f"transform input must be uint8 gray, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1 and image.shape[0] != 1:
            image = image.permute(2, 0, 1)
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3 or image.shape[0] != 1:
            raise ChexdistError(f"transform input must be one gray channel (HxW or 1xHxW), got shape {tuple(image.shape)}")
        return image


_STEP_BYTES = 2 << 20  # float output per step of a CPU batch: within a core's L2


class GrayToNormalizedRGB(nn.Module):
    """uint8 [1,H,W] -> float32 [3,H,W] = (x/255 - mean) / std per channel, in one multiply and one add."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[1,H,W] -> [3,H,W], or a batch [B,1,H,W] -> [B,3,H,W] (e.g. on the GPU after transfer)."""
        if image.ndim not in (3, 4) or image.shape[-3] != 1:
            raise ChexdistError(f"expected 1-channel images [1,H,W] or [B,1,H,W], got shape {tuple(image.shape)}")
        if self.shift.device != image.device:
            self.to(image.device)
        if image.ndim == 4 and image.device.type == "cpu" and not torch.compiler.is_compiling():
            return self._in_steps(image)
        # A multiply then an in-place add: on CPU twice as fast as one broadcasting addcmul (0.03 vs 0.07 ms per 224-px image).
        return (image.to(torch.float32) * self.scale).add_(self.shift)

    def _in_steps(self, images: torch.Tensor) -> torch.Tensor:
        """A CPU batch a few images at a time, each step's output still in cache for its add: about 30%
        less CPU than the whole batch at once (a 224-px batch of 32 is 19 MB of float), the same values."""
        out = torch.empty((images.shape[0], self.scale.shape[0], *images.shape[-2:]), dtype=torch.float32)
        step = max(1, _STEP_BYTES // max(1, out[0].numel() * 4))
        for i in range(0, images.shape[0], step):
            torch.mul(images[i:i + step], self.scale, out=out[i:i + step]).add_(self.shift)
        return out


def _check(preset: str, image_size: int, eval_resize: int, brightness: float, contrast: float,
           scale_min: float, degrees: float, translate: float) -> None:
    if preset not in PRESETS:
        raise ChexdistError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if image_size < 1:
        raise ChexdistError(f"image_size must be >= 1, got {image_size}")
    if eval_resize < image_size:
        raise ChexdistError(f"eval_resize ({eval_resize}) must be >= image_size ({image_size})")
    if not 0.0 < scale_min <= 1.0:
        raise ChexdistError(f"scale_min must be in (0, 1], got {scale_min}")
    for name, value in (("brightness", brightness), ("contrast", contrast), ("degrees", degrees)):
        if value < 0:
            raise ChexdistError(f"{name} must be >= 0, got {value}")
    if not 0.0 <= translate < 1.0:
        raise ChexdistError(f"translate must be in [0, 1), got {translate}")


def build_transform(
    preset: str,
    image_size: int = 224,
    eval_resize: int = 256,
    train: bool = True,
    brightness: float = _AUG.brightness,
    contrast: float = _AUG.contrast,
    scale_min: float = _AUG.scale_min,
    degrees: float = _AUG.degrees,
    translate: float = _AUG.translate,
    normalization: dict[str, list[float]] | None = None,
) -> v2.Compose:
    """The transform for `preset` (train=True) or the eval transform (train=False; preset still checked).

    `normalization` {"mean": [3], "std": [3]} is the model's (`resolve_normalization`; default ImageNet's).

    Randomness comes from torch's global RNG, which the train loader forks per stream so augmentation
    is reproducible for a given (seed, epoch, rank, worker).
    """
    _check(preset, image_size, eval_resize, brightness, contrast, scale_min, degrees, translate)
    eval_geometry = [v2.Resize(eval_resize, antialias=True), v2.CenterCrop(image_size)]
    if not train or preset == "none":
        ops: list[nn.Module] = eval_geometry
    elif preset == "flip":
        ops = eval_geometry + [v2.RandomHorizontalFlip()]
    else:
        ops = [
            v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if brightness or contrast:
            ops.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
        if preset == "strong" and (degrees or translate):
            ops.append(v2.RandomAffine(degrees=degrees, translate=(translate, translate)))
    norm = resolve_normalization(given=normalization)
    return v2.Compose([ToGrayTensor(), *ops, GrayToNormalizedRGB(tuple(norm["mean"]), tuple(norm["std"]))])


def device_load_size(preset: str, image_size: int, eval_resize: int, scale_min: float) -> int:
    """The square side the device resizes a batch to before its random ops (aug.where=device).

    flip / none: eval_resize (then the eval centre crop and, for flip, the flip). dannynet / strong:
    max(eval_resize, ceil(image_size / sqrt(scale_min))), so that the smallest square crop
    RandomResizedCrop can take is still >= image_size px (not upsampled), and the largest is shrunk
    at most 1 / sqrt(scale_min) times by the crop's own (not antialiased) resampling."""
    if preset not in ("dannynet", "strong"):
        return eval_resize
    return max(eval_resize, math.ceil(image_size / math.sqrt(scale_min)))


def load_transform(
    preset: str,
    image_size: int = 224,
    eval_resize: int = 256,
    scale_min: float = _AUG.scale_min,
    normalization: dict[str, list[float]] | None = None,
    source_size: int = 0,
) -> v2.Compose:
    """The workers' per-image transform when the train augmentation runs on the device: Resize(W) +
    CenterCrop(W), deterministic, so batches stack.

    W = `source_size` when given (the shards' packed size: pack gives every image that shorter
    side, so the resize is a no-op and the workers only decode; the device then resizes, with
    antialiasing), else `device_load_size`. A non-square image loses the edges of its longer side,
    as the eval crop does. Ends with the normalization, which `split_normalization` hands to the
    consumer."""
    _check(preset, image_size, eval_resize, 0.0, 0.0, scale_min, 0.0, 0.0)
    if source_size < 0:
        raise ChexdistError(f"source_size must be >= 0, got {source_size}")
    side = source_size or device_load_size(preset, image_size, eval_resize, scale_min)
    norm = resolve_normalization(given=normalization)
    return v2.Compose([ToGrayTensor(), v2.Resize(side, antialias=True), v2.CenterCrop(side),
                       GrayToNormalizedRGB(tuple(norm["mean"]), tuple(norm["std"]))])


def train_transform(config: Config, normalization: dict | None = None, on_device: bool = False,
                    source_size: int = 0) -> v2.Compose:
    """The train loader's per-image transform of a run: the preset's (workers augment), or with
    `on_device` the deterministic `load_transform` to `source_size` (the device augments:
    `chexdist.data.batchaug`)."""
    aug, data = config.aug, config.data
    if on_device:
        return load_transform(aug.preset, data.image_size, data.resolved_eval_resize, aug.scale_min, normalization,
                              source_size)
    return build_transform(aug.preset, image_size=data.image_size, eval_resize=data.resolved_eval_resize, train=True,
                           brightness=aug.brightness, contrast=aug.contrast, scale_min=aug.scale_min,
                           degrees=aug.degrees, translate=aug.translate, normalization=normalization)


def eval_transform(config: Config, normalization: dict | None = None) -> v2.Compose:
    """The eval transform of a run (Resize eval_resize + CenterCrop image_size), normalized with the
    run's recorded mean/std (best.json `normalization`; ImageNet when absent)."""
    return build_transform(
        config.aug.preset, image_size=config.data.image_size, eval_resize=config.data.resolved_eval_resize,
        train=False, normalization=normalization,
    )


def split_normalization(transform: v2.Compose) -> tuple[v2.Compose, GrayToNormalizedRGB]:
    """(uint8 part, normalization) of a built transform, so normalization can run after transfer.

    Batches of uint8 [B,1,H,W] are 12x smaller than float [B,3,H,W]: less worker-to-main copying,
    less pinned memory and host-to-device traffic; the normalization is then one op on the device.
    """
    steps = list(getattr(transform, "transforms", []))
    if not steps or not isinstance(steps[-1], GrayToNormalizedRGB):
        raise ChexdistError("this transform does not end with chexdist's normalization; build it with build_transform")
    return v2.Compose(steps[:-1]), steps[-1]
