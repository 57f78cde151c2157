"""Model factory (torchvision DenseNet-121 + any timm architecture), local weights and checkpoint import.

Weights are never downloaded: `pretrained` is always a local file, so a training job on an offline
cluster node behaves the same as on a laptop, and a missing file fails before any work starts.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_bytes
from chexdist.labels import LABELS, NUM_LABELS, check_labels

log = logging.getLogger(__name__)

HEADS = ("linear", "dense_bn")
DENSE_BN_WIDTH = 512
TORCHVISION_DENSENET = "densenet121"

_OLD_DENSELAYER_NAME = re.compile(r"(\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class DropoutLinear(nn.Linear):
    """Linear classifier with dropout on its input, so DenseNet-121 keeps the `classifier.weight/bias`
    key names of CheXNet-family checkpoints while honouring `drop_rate` like timm models do."""

    def __init__(self, in_features: int, out_features: int, drop_rate: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, self.drop_rate, self.training))


def dense_bn_head(in_features: int, num_classes: int, drop_rate: float) -> nn.Sequential:
    """Pooled features -> Dense -> BatchNorm -> ReLU -> Dropout -> logits (Kufel et al. 2023 head).

    BatchNorm1d needs more than one sample per training batch; the loader's equal, full batches give that.
    """
    return nn.Sequential(
        nn.Linear(in_features, DENSE_BN_WIDTH),
        nn.BatchNorm1d(DENSE_BN_WIDTH),
        nn.ReLU(inplace=True),
        nn.Dropout(drop_rate),
        nn.Linear(DENSE_BN_WIDTH, num_classes),
    )


def _check_args(name: str, num_classes: int, drop_rate: float, head: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ChexdistError("model.name: empty; use 'densenet121' or a timm architecture such as 'efficientnet_b0'")
    if "/" in name or ":" in name:
        raise ChexdistError(
            f"model.name: {name!r} is a hub reference; chexdist never downloads, so give the bare architecture "
            f"(e.g. {name.split('/')[-1].split(':')[-1]!r}) and local weights via model.pretrained=PATH"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ChexdistError(f"num_classes: {num_classes!r} must be a positive integer (14 for ChestX-ray14)")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ChexdistError(f"model.drop_rate: {drop_rate!r} must be in [0, 1)")
    if head not in HEADS:
        raise ChexdistError(f"model.head: unknown head {head!r}; expected one of {', '.join(HEADS)}")


def _unknown_model_error(name: str) -> ChexdistError:
    import timm

    close = difflib.get_close_matches(name, [TORCHVISION_DENSENET, *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    return ChexdistError(
        f"model.name: unknown architecture {name!r}{hint} Use 'densenet121' (torchvision layout) or a timm name; "
        "list them with: python -c \"import timm; print(timm.list_models('efficientnet*'))\""
    )


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the classifier head(s) (`classifier`, `fc`, `head`, `head.fc`, ...): the only
    part of a model allowed to stay at random init when backbone weights are loaded."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        return (names,)
    if isinstance(names, (tuple, list)) and names:
        return tuple(names)
    if hasattr(model, "classifier"):
        return ("classifier",)
    raise ChexdistError(f"{type(model).__name__}: cannot tell which module is the classifier; use a timm model")


def create_model(
    name: str,
    num_classes: int = NUM_LABELS,
    pretrained: str | os.PathLike | None = None,
    drop_rate: float = 0.0,
    head: str = "linear",
) -> nn.Module:
    """Build `name` with `num_classes` logits and optionally load local weights.

    `densenet121` is torchvision's layout (CheXNet checkpoints import into it); every other name is a
    timm architecture. `drop_rate` is dropout on the pooled features before the classifier (inside
    the dense_bn head for that head). The load report of `pretrained` is logged and kept as
    `model.pretrained_report`.
    """
    _check_args(name, num_classes, drop_rate, head)
    drop_rate = float(drop_rate)
    head_drop = drop_rate if head == "linear" else 0.0
    if name == TORCHVISION_DENSENET:
        import torchvision

        model = torchvision.models.densenet121(weights=None)
        model.classifier = DropoutLinear(model.classifier.in_features, num_classes, head_drop)
    else:
        import timm

        if not timm.is_model(name):
            raise _unknown_model_error(name)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=head_drop)
    if head == "dense_bn":
        heads = classifier_names(model)
        if len(heads) != 1:
            raise ChexdistError(f"model.head: {name} has {len(heads)} classifier heads; use model.head=linear")
        path = heads[0]
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise ChexdistError(f"model.head: {name} has a {type(linear).__name__} classifier; use model.head=linear")
        _replace_submodule(model, path, dense_bn_head(linear.in_features, num_classes, drop_rate))
    model.chexdist_arch = name
    if pretrained is not None and str(pretrained) != "":
        report = load_pretrained(model, pretrained, arch=name)
        level = logging.WARNING if report["classifier_reinitialized"] else logging.INFO
        log.log(level, "%s", report["message"])
        model.pretrained_report = report
    return model


def model_normalization(model: nn.Module | str) -> dict[str, list[float]]:
    """{"mean", "std"} the architecture's pretrained weights expect, for a model or an arch name.

    timm's data config when the model has a pretrained config (ViT-B/16: 0.5/0.5, EfficientNet:
    ImageNet's); ImageNet's for torchvision's DenseNet-121 (CheXNet). pretrained_cfg is metadata:
    nothing is downloaded.
    """
    import timm
    import timm.data

    from chexdist.data.transforms import NORMALIZATION

    if isinstance(model, str):
        if model == TORCHVISION_DENSENET:
            return {k: list(v) for k, v in NORMALIZATION.items()}
        if not timm.is_model(model):
            raise _unknown_model_error(model)
        cfg = timm.models.get_pretrained_cfg(model)
        data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()) if cfg is not None else NORMALIZATION
    elif getattr(model, "pretrained_cfg", None):
        data = timm.data.resolve_model_data_config(model)
    else:
        data = NORMALIZATION
    return {"mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]]}


def check_input_size(name: str, image_size: int) -> None:
    """Refuse an image size the architecture cannot take (ViT-B/16 at 512 px), before any work."""
    fixed = fixed_input_size(name)
    if fixed is not None and image_size != fixed:
        raise ChexdistError(
            f"config key 'data.image_size': {image_size} px does not fit model.name {name!r}, which takes "
            f"{fixed} px inputs only; set data.image_size={fixed} (and data.eval_resize >= {fixed})"
        )


def fixed_input_size(name: str) -> int | None:
    """Square input size an architecture requires (ViT: 224), or None when any size works; lets the
    config refuse e.g. data.image_size=512 with vit_base_patch16_224 before training starts."""
    if name == TORCHVISION_DENSENET:
        return None
    import timm

    if not timm.is_model(name):
        raise _unknown_model_error(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.fixed_input_size:
        return None
    return int(cfg.input_size[-1])


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last spatial feature map, for Grad-CAM.

    DenseNet-121: `features`; EfficientNet: `bn2` (after conv_head); other timm models: the last stage
    from `feature_info` (ResNet `layer4`, ConvNeXt `stages.3`). For ViTs this is the last block, whose
    output is tokens (N, 1 + H*W, D): Grad-CAM must drop the class token and reshape to a grid. A
    class-token ViT reads only the class token of that output, so the patch tokens get no gradient
    there; its layer is the last block's `norm1`, whose tokens feed the class token through attention.
    """
    if hasattr(model, "features") and isinstance(model.features, nn.Module) and not hasattr(model, "feature_info"):
        return model.features
    if hasattr(model, "patch_embed") and getattr(model, "global_pool", None) == "token" and hasattr(model, "blocks"):
        return model.blocks[-1].norm1
    if hasattr(model, "conv_head") and isinstance(getattr(model, "bn2", None), nn.Module):
        return model.bn2
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        return model.get_submodule(last["module"])
    for attr in ("layer4", "stages", "blocks", "features"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Sequential | nn.ModuleList) and len(sub):
            return sub[-1]
        if isinstance(sub, nn.Module):
            return sub
    raise ChexdistError(f"{type(model).__name__}: no known last conv block for Grad-CAM; pass the layer explicitly")


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


