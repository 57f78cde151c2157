"""Architecture facts: input normalization, fixed input sizes, classifier and Grad-CAM layers.

A leaf: it imports nothing of chexdist but the errors, and torch/timm only inside the functions that
need them, so the config can check a model name without loading either. timm's pretrained configs are
metadata: nothing here downloads.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from chexdist.errors import ChexdistError

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
NORMALIZATION: dict[str, list[float]] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
TORCHVISION_DENSENET = "densenet121"


def unknown_model_error(name: str) -> ChexdistError:
    """The refusal of an architecture name that is neither torchvision's DenseNet-121 nor timm's."""
    import timm

    close = difflib.get_close_matches(name, [TORCHVISION_DENSENET, *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    return ChexdistError(
        f"model.name: unknown architecture {name!r}{hint} Use 'densenet121' (torchvision layout) or a timm name; "
        "list them with: python -c \"import timm; print(timm.list_models('efficientnet*'))\""
    )


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


def resolve_normalization(model: nn.Module | str | None = None, given: Mapping[str, Any] | None = None) -> dict[str, list[float]]:
    """{"mean", "std"} to normalize a model's inputs with: the one place this is decided.

    `given` (e.g. best.json's `normalization`, what the model was trained with) wins, checked;
    otherwise what `model`'s pretrained weights expect, for a model or an arch name: timm's data
    config when it has a pretrained config (ViT-B/16: 0.5/0.5, EfficientNet: ImageNet's), ImageNet's
    for torchvision's DenseNet-121 (CheXNet); ImageNet's when neither is given.
    """
    if given:
        try:
            return {k: [float(v) for v in given[k]] for k in ("mean", "std")}
        except (KeyError, TypeError, ValueError):
            raise ChexdistError(f"normalization {given!r}: expected {{'mean': [3 floats], 'std': [3 floats]}}") from None
    data: Mapping[str, Any] = NORMALIZATION
    if isinstance(model, str) and model != TORCHVISION_DENSENET:
        import timm
        import timm.data

        if not timm.is_model(model):
            raise unknown_model_error(model)
        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is not None:
            data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    elif model is not None and not isinstance(model, str) and getattr(model, "pretrained_cfg", None):
        import timm.data

        data = timm.data.resolve_model_data_config(model)
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
        raise unknown_model_error(name)
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
    from torch import nn

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
