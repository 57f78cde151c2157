"""One shard sample, read as training reads it: its parts checked, its labels parsed, its image decoded.

The loader and `chexdist shards verify` both go through :func:`read_sample`, so a sample that verify
passes is one the loader reads, and one it flags is one the loader would skip.
"""

from __future__ import annotations

import json
import warnings

import torch

from chexdist.data.shardformat import IMAGE_KEYS
from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, NUM_LABELS, UNKNOWN

# torchvision 0.29 deprecates its decoders in favour of TorchCodec but they remain the fastest here
# (512-px PNG 2.2 ms vs PIL 2.6 ms; JPEG 0.44 vs 0.50 ms); PIL takes over once they are gone.
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"
try:
    from torchvision.io import ImageReadMode as _ReadMode
    from torchvision.io import decode_image as _tv_decode
except ImportError:
    _tv_decode = None


def decode_gray(data: bytes) -> torch.Tensor:
    """Shard image bytes -> uint8 tensor [1,H,W] (libpng/libjpeg-turbo via torchvision; PIL as fallback).

    torchvision warns on every call that its decoders are deprecated; that one warning is silenced
    here, around the call, not process-wide."""
    if _tv_decode is not None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
                image = _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_ReadMode.GRAY)
            if image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 1:
                return image
        except RuntimeError:
            pass
    from chexdist.data.images import decode_gray8

    return torch.from_numpy(decode_gray8(data)).unsqueeze(0)


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a shard sample (png or jpg part); raises if the sample lacks it or its json."""
    found = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if found is None or "json" not in sample:
        raise ChexdistError(f"sample has parts {sorted(k for k in sample if not k.startswith('__'))}, expected json and png/jpg")
    return found


def parse_labels(sample: dict) -> tuple[torch.Tensor, dict]:
    """(float32 labels [14], metadata) from a sample's json part, the labels checked; an unknown
    label (null) becomes NaN (`chexdist.labels.UNKNOWN`)."""
    meta = json.loads(sample["json"])
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != NUM_LABELS or any(
        v is not None and v not in (0, 1) for v in labels
    ):
        raise ChexdistError(f"'labels' must be {NUM_LABELS} values 0, 1 or null (unknown) in the order {', '.join(LABELS)}")
    return torch.tensor([UNKNOWN if v is None else v for v in labels], dtype=torch.float32), meta


def read_sample(sample: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(gray uint8 image [1,H,W], labels [14], metadata) of a shard sample; whatever this raises is
    what makes the loader count and skip the sample."""
    encoded = image_bytes(sample)
    labels, meta = parse_labels(sample)
    return decode_gray(encoded), labels, meta
