"""Model factory: torchvision DenseNet-121 or any timm architecture, with the chosen head and
optionally local weights (`weights.load_pretrained`).

Weights are never downloaded: `pretrained` is always a local file, so a training job on an offline
cluster node behaves the same as on a laptop, and a missing file fails before any work starts.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.labels import NUM_LABELS
from chexdist.models.arch import TORCHVISION_DENSENET, classifier_names, unknown_model_error
from chexdist.models.weights import load_pretrained

log = logging.getLogger(__name__)

HEADS = ("linear", "dense_bn")
DENSE_BN_WIDTH = 512


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


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


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
            raise unknown_model_error(name)
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
