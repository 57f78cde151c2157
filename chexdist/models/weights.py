"""Weights I/O: local weights files (safetensors or weights_only pickles), the public CheXNet
checkpoint format, and the strict load that lets only the classifier stay at random init.

Weights are never downloaded: a path that looks like a URL or a hub name is refused with the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, check_labels
from chexdist.models.arch import classifier_names
from chexdist.utils.fileio import atomic_write_bytes

_OLD_DENSELAYER_NAME = re.compile(r"(\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def import_chexnet_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Turn a public CheXNet checkpoint (arnoweng/CheXNet and reimplementations) into torchvision
    DenseNet-121 keys: unwrap `state_dict`, drop `module.`/`densenet121.` prefixes, rename
    pre-0.4 torchvision `norm.1`/`relu.1`/`conv.2` to `norm1`/`relu1`/`conv2`, and map the
    Sequential(Linear, Sigmoid) classifier `classifier.0.*` to `classifier.*` (the model outputs
    logits; the sigmoid is applied by the loss and at prediction time)."""
    sd = _unwrap(sd, "CheXNet checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        for prefix in ("module.", "model.", "densenet121."):
            if new.startswith(prefix):
                new = new[len(prefix):]
        new = _OLD_DENSELAYER_NAME.sub(r"\1\2.", new)
        if new.startswith("classifier.0."):
            new = "classifier." + new[len("classifier.0."):]
        if new in out:
            raise ChexdistError(f"CheXNet checkpoint: keys {key!r} and another both map to {new!r}")
        out[new] = value
    return out


def _is_chexnet_format(keys: list[str]) -> bool:
    return any(_OLD_DENSELAYER_NAME.search(k) or ".densenet121." in k or k.startswith("densenet121.") for k in keys)


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint ({"state_dict": ..., "epoch": ...}) or the dict itself."""
    if not isinstance(obj, Mapping):
        raise ChexdistError(f"{source}: holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ChexdistError(
            f"{source}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
            "expected a state dict, possibly under 'state_dict'"
        )
    return tensors


def _strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP `module.` / torch.compile `_orig_mod.` prefixes shared by every key."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _resolve_local(path: str | os.PathLike, arch: str | None) -> Path:
    text = str(path)
    if "://" in text or text.startswith("hf-hub:") or text.startswith("hf_hub:"):
        raise ChexdistError(
            f"model.pretrained: {text!r} is a URL/hub name; chexdist never downloads weights. Download the "
            "file once on a machine with internet and set model.pretrained to its local path (see README)"
        )
    p = Path(text).expanduser()
    if text.startswith("timm/") and not p.exists():
        raise ChexdistError(
            f"model.pretrained: {text!r} is a Hugging Face hub name; chexdist never downloads weights. Save the "
            "weights to a local .safetensors file and set model.pretrained to that path (see README)"
        )
    if p.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (p / candidate).is_file():
                return p / candidate
        raise ChexdistError(f"model.pretrained: {p} is a directory without model.safetensors; pass the weights file")
    if not p.is_file():
        what = f"{arch} ImageNet weights" if arch else "the weights file"
        raise ChexdistError(
            f"model.pretrained: {p} not found; download {what} to {p} (or put a CheXNet/chexdist checkpoint "
            "there; .safetensors or .pth state dict, see README 'Pretrained weights'), or unset model.pretrained"
        )
    return p


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a local weights file; pickles load with weights_only=True."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except ChexdistError:
            raise
        except Exception as exc:
            raise ChexdistError(f"{p}: not a readable safetensors file ({exc}); re-export it") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChexdistError(
            f"{p}: cannot be loaded as weights ({first}); it must be a state dict saved with torch.save "
            "(weights_only=True refuses pickled modules/objects) or a .safetensors file"
        ) from exc
    return _unwrap(obj, str(p)), {}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(model: nn.Module, path: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """Load local weights into `model` strictly, except that the classifier may stay at its current
    (random) init when the file has none or one of another shape (ImageNet backbones, another class
    count). Returns a report: path, source (state_dict|chexnet|torchvision_legacy: pre-0.4 names as in
    torchvision's own densenet121-a639ec97.pth), loaded (tensor count),
    classifier_reinitialized, reinitialized (keys), message."""
    arch = arch or getattr(model, "chexdist_arch", None)
    p = _resolve_local(path, arch)
    sd, metadata = read_state_dict(p)
    sd = _strip_wrappers(sd)
    source = "state_dict"
    if _is_chexnet_format(list(sd)):
        wrapped = any(k.startswith(("densenet121.", "classifier.0.")) or ".densenet121." in k for k in sd)
        sd, source = import_chexnet_state_dict(sd), "chexnet" if wrapped else "torchvision_legacy"

    own = model.state_dict()
    head = classifier_names(model)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad_missing = [k for k in missing if not _under(k, head)]
    bad_unexpected = [k for k in unexpected if not _under(k, head)]
    bad_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if not _under(k, head)]
    if bad_missing or bad_unexpected or bad_shape:
        parts = []
        if bad_missing:
            parts.append(f"missing {_few(bad_missing)}")
        if bad_unexpected:
            parts.append(f"unexpected {_few(bad_unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatch {_few(bad_shape, 3)}")
        raise ChexdistError(
            f"model.pretrained: {p} does not fit {arch or type(model).__name__}: {'; '.join(parts)}. "
            "Check model.name matches the checkpoint's architecture"
        )

    head_differs = any(_under(k, head) for k in missing + unexpected + mismatched)
    if head_differs:
        sd = {k: v for k, v in sd.items() if not _under(k, head)}
    elif "labels" in metadata:
        check_labels(json.loads(metadata["labels"]), str(p))
    result = model.load_state_dict(sd, strict=False)
    left = [k for k in result.missing_keys if not (head_differs and _under(k, head)) and not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:
        raise ChexdistError(f"model.pretrained: {p}: keys not loaded: {_few(left + list(result.unexpected_keys))}")

    reinit = [k for k in own if _under(k, head)] if head_differs else []
    what = {"chexnet": "CheXNet checkpoint", "torchvision_legacy": "legacy torchvision weights"}.get(source, "weights")
    if head_differs:
        message = (
            f"loaded {what} from {p} except the classifier '{'/'.join(head)}' (absent or another shape in the file), "
            "which keeps its random init: expected for ImageNet backbone weights"
        )
    else:
        message = f"loaded {what} from {p}, classifier included"
    return {
        "path": str(p),
        "source": source,
        "loaded": len(sd),
        "classifier_reinitialized": head_differs,
        "reinitialized": reinit,
        "message": message,
    }


def save_weights(
    model: nn.Module, path: str | os.PathLike, labels: tuple[str, ...] | list[str] = LABELS, metadata: Mapping[str, str] | None = None
) -> None:
    """Write the model's state dict as .safetensors atomically, with the label order (and arch) in the
    metadata so `load_pretrained` refuses a checkpoint whose classifier rows mean other findings."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in _strip_wrappers(dict(model.state_dict())).items()}
    meta = {"labels": json.dumps(list(labels))}
    arch = getattr(model, "chexdist_arch", None)
    if arch:
        meta["arch"] = arch
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, save(tensors, metadata=meta))


