"""The images a run sends to its trackers at the end (`train.log_with`): the validation ROC curve of
every finding at the best epoch, in one 3x5 grid, and Grad-CAM overlays of the first few validation
images positive for the best model's top finding (the finding with the highest best-epoch val AUROC).

The ROC uses the best epoch's validation predictions, kept in memory by `RunTrackers` when the epoch
improved; a run resumed after its best epoch predicts the val split again with best.safetensors
(one process, the same eval transform). Grad-CAM is `chexdist.evaluation.cam` (the `cam` extra):
without grad-cam installed only the ROC is logged, and one log line says so.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexdist.config import Config
from chexdist.labels import LABELS

log = logging.getLogger("chexdist")

ROC_TAG, CAM_TAG = "best/roc", "best/gradcam"
ROC_FIGSIZE, ROC_DPI = (10.0, 6.0), 64  # a 640 x 384 image
CAM_IMAGES = 4
CAM_MODULE = "pytorch_grad_cam"
IMAGE_TRACKERS = ("tensorboard", "mlflow", "wandb", "aim")


@dataclass
class BestImages:
    """What goes to the trackers: `roc` [H,W,3] uint8 with its figure, the overlays [h,w,3] uint8 of
    `finding` with theirs (none without grad-cam)."""

    epoch: int
    roc: np.ndarray
    roc_figure: Any
    finding: str | None = None
    cam: list[np.ndarray] = field(default_factory=list)
    cam_figure: Any = None

    def close(self) -> None:
        import matplotlib.pyplot as plt

        for fig in (self.roc_figure, self.cam_figure):
            if fig is not None:
                plt.close(fig)


def roc_curves(probs: np.ndarray, targets: np.ndarray, labels=LABELS) -> dict[str, dict[str, np.ndarray]]:
    """label -> {"fpr", "tpr", "auc"} for each finding with positives and negatives among its known
    (non-NaN) targets: `metrics.curve_points`, one point per distinct score, starting at (0, 0); auc is
    the trapezoidal area under those points (the AUROC, ties counted half)."""
    from chexdist.evaluation.metrics import curve_points

    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    curves = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if not (y == 1).any() or not (y == 0).any():
            continue
        pts = curve_points(probs[known, j], y)
        curves[label] = {"fpr": pts["fpr"], "tpr": pts["tpr"], "auc": float(np.trapezoid(pts["tpr"], pts["fpr"]))}
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def roc_figure(curves: dict[str, dict[str, np.ndarray]], title: str, labels=LABELS):
    """One panel per finding (3 x 5 grid): the curve of `curves`, or 'not scorable'."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 5, figsize=ROC_FIGSIZE, dpi=ROC_DPI)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=0.89, wspace=0.25, hspace=0.45)  # no layout engine: fast
    fig.suptitle(title, fontsize=10)
    for ax, label in zip(axes.ravel(), labels):
        ax.set_title(label, fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xticks=[0, 0.5, 1], yticks=[0, 0.5, 1])
        ax.tick_params(labelsize=6)
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        if label not in curves:
            ax.text(0.5, 0.5, "not scorable", ha="center", va="center", fontsize=7)
            continue
        ax.plot(curves[label]["fpr"], curves[label]["tpr"], color="tab:blue", lw=1.5)
        ax.text(0.40, 0.06, f"AUROC {curves[label]['auc']:.3f}", fontsize=7, transform=ax.transAxes)
    for ax in axes.ravel()[len(labels):]:
        ax.axis("off")
    return fig


def roc_title(info: dict[str, Any]) -> str:
    """The ROC figure's title, from the run's best.json."""
    return f"validation ROC, best epoch {info['epoch']} ({info.get('weights', 'raw')} weights)"


def figure_array(fig) -> np.ndarray:
    """The figure rendered to [H, W, 3] uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def val_loader(config: Config, manifest: dict, normalization: dict | None, batch_size: int):
    """The val split for one process (this is rank 0 alone), uint8 batches, the run's eval transform."""
    from chexdist.data.loader import build_eval_loader
    from chexdist.data.transforms import eval_transform

    loader, _ = build_eval_loader(config.data.shards, "val", batch_size, eval_transform(config, normalization), 0, 1, 0,
                                  manifest=manifest, normalize_in_loader=False)
    return loader


@torch.no_grad()
def val_predictions(model, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(probs, targets) of the readable val samples, in split order."""
    probs, targets = [], []
    for batch in loader:
        keep = batch.valid
        logits = model(loader.normalize(batch.images[keep].to(device)))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(batch.labels[keep].numpy())
    return np.concatenate(probs), np.concatenate(targets)


def cam_overlays(model, loader, device: torch.device, finding: int, n: int = CAM_IMAGES) -> list[np.ndarray]:
    """Grad-CAM of `finding` on the first `n` val images labelled positive for it, drawn by
    `cam.overlay_png` (an image whose map is all zero is shown plain)."""
    from PIL import Image

    from chexdist.evaluation.cam import GradCam, overlay_png, upsample

    chosen = []
    for batch in loader:
        chosen.append(batch.images[batch.valid & (batch.labels[:, finding] == 1)])
        if sum(len(c) for c in chosen) >= n:
            break
    images = torch.cat(chosen)[:n]
    with GradCam(model) as explainer:
        maps, _ = explainer(loader.normalize(images.to(device)), [finding] * len(images))
    crops = images[:, 0].numpy()
    heat = upsample(maps, crops.shape[1:])
    return [np.asarray(Image.open(io.BytesIO(overlay_png(c, h))).convert("RGB")) for c, h in zip(crops, heat)]


def cam_figure(overlays: list[np.ndarray], finding: str):
    """The overlays side by side (what MLflow's `log_figure` takes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(overlays), figsize=(2.0 * len(overlays), 2.3), dpi=ROC_DPI, squeeze=False)
    fig.suptitle(f"Grad-CAM: {finding}", fontsize=9)
    for ax, image in zip(axes[0], overlays):
        ax.imshow(image)
        ax.axis("off")
    return fig


def best_images(out: Path, config: Config, manifest: dict, device: torch.device,
                kept: tuple[np.ndarray, np.ndarray] | None = None) -> BestImages:
    """The images of the run in `out`: its best.safetensors, `kept` the best epoch's (val probs,
    targets) when in memory (else predicted again here)."""
    from chexdist.runs import load_best

    model, info = load_best(out)
    model.to(device)
    loader = val_loader(config, manifest, info.get("normalization"), config.data.eval_batch_size or 2 * config.data.batch_size)
    probs, targets = kept if kept is not None else val_predictions(model, loader, device)
    curves = roc_curves(probs, targets)
    fig = roc_figure(curves, roc_title(info))
    images = BestImages(info["epoch"], figure_array(fig), fig)
    if not curves:
        return images
    if importlib.util.find_spec(CAM_MODULE) is None:
        log.warning("train.log_with: grad-cam is not installed, so the trackers get the ROC curves but no Grad-CAM "
                    "overlays; pip install 'chexdist[cam]'")
        return images
    images.finding = max(curves, key=lambda label: curves[label]["auc"])
    images.cam = cam_overlays(model, loader, device, LABELS.index(images.finding))
    images.cam_figure = cam_figure(images.cam, images.finding)
    return images


def send_images(tracker, images: BestImages, step: int) -> None:
    """`images` through one of IMAGE_TRACKERS' own image call.
    TensorBoard: `log_images` (the overlays as one row); W&B: `log_images` (lists); Aim: `log_images`
    (one image per name); MLflow: `log_figure` (artifacts best/roc.png, best/gradcam.png)."""
    named = {ROC_TAG: [images.roc], **({f"{CAM_TAG}/{images.finding}": images.cam} if images.cam else {})}
    if tracker.name == "tensorboard":
        for tag, arrays in named.items():
            tracker.log_images({tag: np.stack(arrays)}, step=step, dataformats="NHWC")
        tracker.writer.flush()
    elif tracker.name == "wandb":
        tracker.log_images(named, step=step)
    elif tracker.name == "aim":
        for tag, arrays in named.items():
            for i, array in enumerate(arrays):
                tracker.log_images({tag if len(arrays) == 1 else f"{tag}/{i}": array}, step=step)
    elif tracker.name == "mlflow":
        tracker.log_figure(images.roc_figure, f"{ROC_TAG}.png")
        if images.cam_figure is not None:
            tracker.log_figure(images.cam_figure, f"{CAM_TAG}.png")
