"""Losses against independent numpy references, at extreme logits and under bf16 autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.training.losses import build_loss, pos_weight_from_counts

torch.set_num_threads(1)


def _data(seed: int = 0, n: int = 6, c: int = 14, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, c, generator=g) < 0.3).double()
    return logits, targets


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(x: np.ndarray, y: np.ndarray, pos_weight: np.ndarray | None = None) -> float:
    p = _np_sigmoid(x)
    w = np.ones(x.shape[1]) if pos_weight is None else pos_weight
    return float(np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p))))


def np_focal(x: np.ndarray, y: np.ndarray, gamma: float, alpha: float | None) -> float:
    p = _np_sigmoid(x)
    p_t = np.where(y == 1, p, 1 - p)
    if alpha is None:
        w = np.ones_like(x)
    elif alpha < 1:
        w = np.where(y == 1, alpha, 1 - alpha)
    else:
        w = np.full_like(x, alpha)
    return float(np.mean(-w * (1 - p_t) ** gamma * np.log(p_t)))


def test_bce_matches_numpy_and_torch() -> None:
    x, y = _data()
    loss = build_loss("bce")(x.float(), y.float())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(np_bce(x.numpy(), y.numpy()), rel=1e-5)
    ref = torch.nn.BCEWithLogitsLoss()(x, y).item()
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_wbce_matches_numpy_with_pos_weight() -> None:
    x, y = _data(1)
    pw = torch.linspace(0.5, 20.0, 14)
    loss = build_loss("wbce", pos_weight=pw)(x.float(), y.float())
    assert loss.item() == pytest.approx(np_bce(x.numpy(), y.numpy(), pw.double().numpy()), rel=1e-5)
    assert loss.item() != pytest.approx(build_loss("bce")(x.float(), y.float()).item(), rel=1e-3)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.75, 1.0, 2.0])
def test_focal_matches_numpy_reference(gamma: float, alpha: float | None) -> None:
    x, y = _data(2)
    loss = build_loss("focal", gamma=gamma, alpha=alpha)(x.float(), y.float())
    assert loss.item() == pytest.approx(np_focal(x.numpy(), y.numpy(), gamma, alpha), rel=1e-5, abs=1e-7)


def test_focal_conventions() -> None:
    x, y = _data(3)
    bce = build_loss("bce")(x.float(), y.float())
    assert build_loss("focal", gamma=0.0)(x.float(), y.float()).item() == pytest.approx(bce.item(), rel=1e-6)
    plain = build_loss("focal", gamma=2.0)(x.float(), y.float())
    assert build_loss("focal", gamma=2.0, alpha=1.0)(x.float(), y.float()).item() == pytest.approx(plain.item(), rel=1e-6)
    assert build_loss("focal", gamma=2.0, alpha=0.5)(x.float(), y.float()).item() == pytest.approx(
        0.5 * plain.item(), rel=1e-6
    )
    assert plain.item() < bce.item()


@pytest.mark.parametrize("name", ["bce", "wbce", "focal"])
def test_extreme_logits_finite_values_and_gradients(name: str) -> None:
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    loss = build_loss(name, pos_weight=torch.full((6,), 3.0))(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert loss.item() > 10.0  # the confidently wrong terms dominate, not clipped to 0


@pytest.mark.parametrize("name", ["bce", "wbce", "focal"])
def test_bf16_autocast_close_to_fp32(name: str) -> None:
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(8, 32, generator=g)
    targets = (torch.rand(8, 14, generator=g) < 0.3).float()
    layer = torch.nn.Linear(32, 14)
    loss_fn = build_loss(name, gamma=2.0, alpha=1.0, pos_weight=torch.linspace(1, 10, 14))
    ref = loss_fn(layer(feats), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(feats)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=3e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_pos_weight_from_counts() -> None:
    counts = {name: 10 for name in LABELS} | {"Hernia": 0, "Infiltration": 50, "Atelectasis": 1}
    w = pos_weight_from_counts(counts, total=1000)
    assert w.shape == (14,) and w.dtype == torch.float32
    assert w[LABELS.index("Cardiomegaly")].item() == pytest.approx(99.0)
    assert w[LABELS.index("Infiltration")].item() == pytest.approx(19.0)
    assert w[LABELS.index("Hernia")].item() == 1.0
    assert w[LABELS.index("Atelectasis")].item() == 100.0  # 999 clamped to the default max
    assert pos_weight_from_counts([1, 500, 1000], total=1000, max_weight=math.inf).tolist() == pytest.approx(
        [999.0, 1.0, 1.0]
    )
    ordered = pos_weight_from_counts([counts[name] for name in LABELS], total=1000)
    assert torch.equal(ordered, w)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ChexdistError, match="bce, wbce, focal"):
        build_loss("dice")
    with pytest.raises(ChexdistError, match="pos_weight"):
        build_loss("wbce")
    with pytest.raises(ChexdistError, match="loss.gamma"):
        build_loss("focal", gamma=-1.0)
    with pytest.raises(ChexdistError, match="loss.alpha"):
        build_loss("focal", alpha=0.0)
    with pytest.raises(ChexdistError, match="Hernia"):
        pos_weight_from_counts({name: 1 for name in LABELS[:-1]}, total=10)
    with pytest.raises(ChexdistError, match="Pneumothrax"):
        pos_weight_from_counts({"Pneumothrax": 1}, total=10)
    with pytest.raises(ChexdistError, match="between 0 and total"):
        pos_weight_from_counts([11], total=10)
    with pytest.raises(ChexdistError, match="classes"):
        build_loss("wbce", pos_weight=[1.0, 2.0])(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ChexdistError, match="batch, classes"):
        build_loss("focal")(torch.zeros(2, 3), torch.zeros(2, 4))
