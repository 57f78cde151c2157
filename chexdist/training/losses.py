"""Multi-label losses on logits: bce, wbce (per-class pos_weight), focal.

All losses take logits [N, C] and 0/1 targets, compute in float32 whatever the autocast dtype
(bf16/fp16 logits lose too much precision in log-sigmoid terms), and average over the known terms:
a NaN target (`chexdist.labels.UNKNOWN`, a finding the sample's dataset does not label) adds
nothing to the loss or its gradient. Without unknowns that is the mean over all N*C terms; a batch
with no known term gives 0 (with a graph, so backward still runs on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS, canonical_name

LOSSES = ("bce", "wbce", "focal")
DEFAULT_MAX_POS_WEIGHT = 100.0


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ChexdistError(
            f"loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [batch, classes]"
        )


def split_known(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 targets with unknowns as 0, float32 mask: 1 where the target is known)."""
    y = targets.float()
    known = ~torch.isnan(y)
    return torch.where(known, y, torch.zeros_like(y)), known.float()


def known_mean(terms: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of `terms` over the known entries (0 when there are none)."""
    return (terms * known).sum() / known.sum().clamp_min(1.0)


class BCEWithLogits(nn.Module):
    """Binary cross-entropy on logits; with `pos_weight` it is the class-weighted variant (wbce)."""

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else pos_weight.float(), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        pos_weight = self.pos_weight
        if pos_weight is not None:
            if pos_weight.numel() != logits.shape[1]:
                raise ChexdistError(
                    f"loss: pos_weight has {pos_weight.numel()} entries but the model has {logits.shape[1]} classes"
                )
            pos_weight = pos_weight.to(logits.device)
        y, known = split_known(targets)
        terms = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction="none")
        return known_mean(terms, known)

    def extra_repr(self) -> str:
        return "" if self.pos_weight is None else f"pos_weight={self.pos_weight.tolist()}"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) on logits: mean of -w (1 - p_t)^gamma log(p_t).

    Convention for `alpha`, chosen so that recipes written both ways mean what their authors meant:
    - 0 < alpha < 1: Lin et al.'s class balance, w = alpha for positives and 1 - alpha for negatives;
    - alpha >= 1 or None: a constant multiplier w = alpha (None = 1) on every term. This is the popular
      `alpha * (1 - pt)**gamma * bce` implementation; DannyNet's "alpha 1, gamma 2" is plain focal BCE.
    gamma = 0 with alpha None is exactly BCE. log(p_t) comes from logsigmoid, so no log(0) at any logit.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ChexdistError(f"loss.gamma: {gamma!r} must be a finite number >= 0 (2 is the usual value)")
        if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
            raise ChexdistError(
                f"loss.alpha: {alpha!r} must be > 0: in (0, 1) it balances positives/negatives, >= 1 scales all terms"
            )
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        x = logits.float()
        y, known = split_known(targets)
        log_pt = y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x)
        loss = -log_pt
        if self.gamma != 0.0:
            loss = loss * (-torch.expm1(log_pt)).clamp_min(0.0).pow(self.gamma)
        if self.alpha is not None:
            if self.alpha < 1.0:
                loss = loss * (self.alpha * y + (1.0 - self.alpha) * (1.0 - y))
            else:
                loss = loss * self.alpha
        return known_mean(loss, known)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


def pos_weight_from_counts(
    positives: Mapping[str, int] | Sequence[int],
    total: int,
    max_weight: float = DEFAULT_MAX_POS_WEIGHT,
    negatives: Mapping[str, int] | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-class negatives/positives, the usual wbce weight, from the training split's counts.

    `negatives` (a format-2 manifest's known negatives per class) makes the weight count known
    labels only; without it every image that is not positive counts as a negative (format 1, NIH).

    `positives` is the manifest's label -> count mapping (ordered by LABELS) or a sequence in label
    order. A class with no positives (or no negatives) gets 1.0: with no positives pos_weight scales
    no term, and with no negatives n/p = 0 would erase the positives, so neutral 1 is the safe value. Weights are clamped to
    [1/max_weight, max_weight] so a handful of positives (Hernia is ~0.2% of NIH, ratio ~500) cannot
    dominate the gradient; pass max_weight=math.inf to disable.
    """
    counts = _in_label_order(positives, "positives")
    known = [total] * len(counts) if negatives is None else [p + n for p, n in zip(counts, _in_label_order(negatives, "negatives"))]
    if not isinstance(total, int) or total < 1:
        raise ChexdistError(f"total: {total!r} must be a positive number of training images")
    if not max_weight >= 1.0:
        raise ChexdistError(f"max_weight: {max_weight!r} must be >= 1")
    weights = []
    for i, (count, n) in enumerate(zip(counts, known)):
        if count < 0 or count > n or n > total:
            raise ChexdistError(f"positives[{i}]: {count!r} must be between 0 and total={n} (the known labels of {total} images)")
        weights.append(1.0 if count in (0, n) else (n - count) / count)
    return torch.tensor(weights, dtype=torch.float32).clamp(1.0 / max_weight, max_weight)


def _in_label_order(counts: Mapping[str, int] | Sequence[int], what: str) -> list[int]:
    if not isinstance(counts, Mapping):
        return list(counts)
    by_name = {canonical_name(str(k), what): v for k, v in counts.items()}
    missing = [name for name in LABELS if name not in by_name]
    if missing:
        raise ChexdistError(f"{what}: no count for {', '.join(missing)}; give all 14 labels")
    return [by_name[name] for name in LABELS]


def build_loss(
    name: str,
    gamma: float = 2.0,
    alpha: float | None = None,
    pos_weight: torch.Tensor | Sequence[float] | None = None,
) -> nn.Module:
    """Loss module from config keys loss.name / loss.gamma / loss.alpha; `pos_weight` (from
    `pos_weight_from_counts`) is required by wbce and ignored by the others, as gamma/alpha are by bce."""
    if name == "bce":
        return BCEWithLogits()
    if name == "wbce":
        if pos_weight is None:
            raise ChexdistError(
                "loss.name=wbce needs per-class pos_weight; compute it with "
                "chexdist.training.losses.pos_weight_from_counts(manifest positives, train count)"
            )
        weight = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
        if not bool(torch.isfinite(weight).all()) or bool((weight <= 0).any()):
            raise ChexdistError(f"loss: pos_weight must be finite and > 0, got {weight.tolist()}")
        return BCEWithLogits(weight)
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha)
    raise ChexdistError(f"loss.name: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
