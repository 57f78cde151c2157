"""Grad-CAM heatmaps of an exported model, PNG overlays, and localization scores against
radiologist boxes (pointing game, IoU of the thresholded map's box) with patient-bootstrap CIs.

Grad-CAM is pytorch-grad-cam's (the `cam` extra) at the models' `gradcam_target_layer`: DenseNet's
`features` (taken after the functional ReLU the classifier pools), ResNet's `layer4`, EfficientNet's
`bn2`, and for a ViT the last block's tokens reshaped to the patch grid (for a class-token ViT the
block's `norm1`: its classifier reads only the class token of the block's output, so that output's
patch tokens get no gradient).
Maps stay at the feature grid's resolution, min-max scaled to [0, 1]; the pointing game's peak is the
centre of the strongest grid cell (the map holds nothing finer), and overlays and the IoU box use the
bilinear upsampling to the input crop, scaled to [0, 1] again. An all-zero map is reported as
`NO_EVIDENCE`, never drawn as a uniform tint. Scores are computed in the model's input crop: boxes are
mapped there through the same resize and crop as the image, clipped to it, and a box the crop
removes entirely is counted (``boxes_outside_crop``) and left out of the rates.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_bytes
from chexdist.evaluation.inputs import Failure, InputPipeline, Prepared, expand_inputs, iter_prepared
from chexdist.labels import LABELS
from chexdist.evaluation.metrics import bootstrap_mean_ci
from chexdist.models.arch import gradcam_target_layer
from chexdist.data.nih import BBOX_FINDINGS

NIH_BOX_FRAME = 1024  # BBox_List_2017 coordinates are pixels of the released 1024x1024 PNGs
IOU_LEVELS = (0.1, 0.25, 0.5)
GT_COLOUR, MAP_COLOUR = (0, 255, 0), (255, 255, 255)
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.(png|jpe?g)$", re.IGNORECASE)


class _TokenGrid:
    """ViT tokens (B, prefix + h*w, D) -> (B, D, h, w): drop class/register tokens, restore the grid."""

    def __init__(self, model: nn.Module):
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        body = tokens[:, self.prefix :, :]
        h, w = self.grid
        if body.shape[1] != h * w:
            raise ChexdistError(f"ViT Grad-CAM: {body.shape[1]} patch tokens do not fill the {h}x{w} grid")
        return body.reshape(body.shape[0], h, w, body.shape[2]).permute(0, 3, 1, 2)


class _PooledDenseNet(nn.Module):
    """torchvision's DenseNet forward with its functional ReLU as a module, so Grad-CAM can take the
    map the classifier pools (hooking `features` and letting the model's in-place ReLU follow would
    zero the gradient wherever that map is 0, which shrinks the channel weights)."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features, self.relu, self.classifier = densenet.features, nn.ReLU(), densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.relu(self.features(x)), 1), 1))


class GradCam:
    """Grad-CAM of one model at its last spatial block; call with inputs [B,3,H,W] and one class
    index per row; returns (maps [B,h,w] in [0,1] at feature resolution, logits [B,C])."""

    def __init__(self, model: nn.Module):
        try:
            from pytorch_grad_cam import GradCAM
        except ImportError:
            raise ChexdistError("Grad-CAM needs the grad-cam package: pip install 'chexdist[cam]'") from None

        class FeatureGridGradCAM(GradCAM):
            def get_target_width_height(self, input_tensor):  # no resize: we upsample ourselves
                return None

        from torchvision.models import DenseNet

        self.model = model.eval()
        self.layer = gradcam_target_layer(model)
        self.layer_name = next(name for name, m in model.named_modules() if m is self.layer)
        if isinstance(model, DenseNet) and self.layer is model.features:
            model = _PooledDenseNet(model).eval()
            self.layer, self.layer_name = model.relu, "relu(features)"
        tokens = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        self._wrapped, self._cam_class = model, FeatureGridGradCAM
        self._reshape = _TokenGrid(model) if tokens else None

    def __call__(self, inputs: torch.Tensor, classes: Iterable[int]) -> tuple[np.ndarray, torch.Tensor]:
        """The CAM object lives for one call, as a context manager: its hooks are on the model only
        while it runs, so a long-running server calling this again and again holds none between calls."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        with self._cam_class(self._wrapped, [self.layer], reshape_transform=self._reshape) as cam, torch.enable_grad():
            maps = cam(input_tensor=inputs, targets=targets)
            logits = cam.outputs.detach().float().cpu()
        return np.asarray(maps, dtype=np.float32), logits

    def close(self) -> None:
        """Nothing to release: each call's hooks are gone when it returns (kept for `with GradCam(...)`)."""

    def __enter__(self) -> GradCam:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


NO_EVIDENCE = "no positive evidence at the target layer"


def is_empty(grid_map: np.ndarray) -> bool:
    """An all-zero map: Grad-CAM's ReLU removed everything (with global pooling and a linear head,
    whenever the logit sits below the bias); there is nothing to draw."""
    return not grid_map.size or float(np.max(grid_map)) <= 0.0


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Feature-grid maps [B,h,w] -> [B,H,W] by bilinear interpolation (pixel centres aligned), each
    min-max scaled to [0, 1] again: interpolation between cell centres leaves the peak below 1 and
    the floor above 0. All-zero maps stay zero."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    lo = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (up - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def peak_point(grid_map: np.ndarray, size: tuple[int, int]) -> tuple[float, float] | None:
    """(x, y) in input pixels of the strongest grid cell's centre; None for an all-zero map."""
    if not grid_map.size or float(grid_map.max()) <= 0.0:
        return None
    i, j = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    return (j + 0.5) * size[1] / grid_map.shape[1], (i + 0.5) * size[0] / grid_map.shape[0]


def map_box(heat: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the connected region at >= threshold * max that holds the map's maximum."""
    from scipy import ndimage

    top = float(heat.max()) if heat.size else 0.0
    if top <= 0.0:
        return None
    regions, _ = ndimage.label(heat >= threshold * top)
    iy, ix = np.unravel_index(int(np.argmax(heat)), heat.shape)
    ys, xs = np.nonzero(regions == regions[iy, ix])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> float:
    if a is None or b is None:
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def clip_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(float(size[1]), box[2]), min(float(size[0]), box[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def overlay_png(crop: np.ndarray, heat: np.ndarray, boxes: Iterable[tuple[tuple[float, ...], tuple[int, int, int]]] = ()) -> bytes:
    """The model's input crop (gray) with the heatmap blended in (jet colour map) and boxes drawn."""
    from PIL import Image, ImageDraw
    from pytorch_grad_cam.utils.image import show_cam_on_image

    gray = np.repeat(crop[..., None], 3, axis=2)
    if is_empty(heat):  # no evidence: the plain crop, not a uniformly tinted one
        image = Image.fromarray(gray.astype(np.uint8))
    else:
        rgb = gray.astype(np.float32) / 255.0
        image = Image.fromarray(show_cam_on_image(rgb, np.clip(heat, 0.0, 1.0), use_rgb=True, image_weight=0.6))
    draw = ImageDraw.Draw(image)
    for box, colour in boxes:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def overlay_name(path: Path, finding: str) -> str:
    return f"{path.stem}_{finding}.png"


def check_unique_names(files: list[Path]) -> None:
    """Overlays are named by file stem; two inputs with one stem would overwrite each other."""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem] != f:
            raise ChexdistError(f"{f} and {seen[f.stem]} share the name {f.stem!r}; overlays would collide, pass them separately")
        seen[f.stem] = f


def write_overlays(explainer: GradCam, items: list[tuple[Prepared, int]], out_dir: Path, batch_size: int) -> list[Path | None]:
    """Grad-CAM of (image, finding index) pairs written as `<stem>_<finding>.png` under out_dir; None
    (and no file) for a pair whose map is all zero (`NO_EVIDENCE`)."""
    written: list[Path | None] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        device = next(explainer.model.parameters()).device
        maps, _ = explainer(torch.stack([p.input for p, _ in chunk]).to(device), [c for _, c in chunk])
        heat = upsample(maps, chunk[0][0].crop.shape)
        for (prepared, cls), grid, h in zip(chunk, maps, heat):
            if is_empty(grid):
                written.append(None)
                continue
            target = out_dir / overlay_name(prepared.path, LABELS[cls])
            atomic_write_bytes(target, overlay_png(prepared.crop, h))
            written.append(target)
    return written


def _groups(names: list[str]) -> tuple[list[Any], str]:
    """Patient IDs from NIH file names (00012345_001.png) when all follow it, else one group per image."""
    matches = [_NIH_NAME.match(n) for n in names]
    if names and all(matches):
        return [int(m.group(1)) for m in matches], "patients"
    return list(names), "images"


def _summary(rows: list[dict], n_boot: int, seed: int, level: float) -> dict[str, Any]:
    if not rows:
        return {"boxes": 0, "pointing_hit_rate": None, "iou_mean": None, "reason": "no scorable boxes among the given images"}
    groups, _ = _groups([r["image"] for r in rows])
    hits = [float(r["hit"]) for r in rows]
    ious = [r["iou"] for r in rows]
    pointing = bootstrap_mean_ci(hits, groups, n_boot, seed, level)
    iou = bootstrap_mean_ci(ious, groups, n_boot, seed, level)
    return {
        "boxes": len(rows),
        "images": len({r["image"] for r in rows}),
        "pointing_hit_rate": pointing["value"],
        "pointing_ci": pointing["ci"],
        "chance_hit_rate": float(np.mean([r["box_area_fraction"] for r in rows])),
        "iou_mean": iou["value"],
        "iou_ci": iou["ci"],
        "iou_at_least": {str(t): float(np.mean([v >= t for v in ious])) for t in IOU_LEVELS},
        "mean_visible_fraction": float(np.mean([r["visible_fraction"] for r in rows])),
    }


def _load_boxes(boxes: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(boxes, pd.DataFrame):
        return boxes
    from chexdist.data.nih import read_bbox_list

    return read_bbox_list(boxes)


def _box_items(prepared: Prepared, boxes: pd.DataFrame, box_frame: int) -> tuple[list[tuple], int]:
    """(prepared, class index, box in input pixels, its part inside the crop) per box of one image,
    and how many boxes the crop removes entirely."""
    items, outside = [], 0
    for box in boxes[boxes["image"] == prepared.path.name].itertuples(index=False):
        h0, w0 = prepared.geometry.original
        fy, fx = (h0 / box_frame, w0 / box_frame) if box_frame else (1.0, 1.0)
        full = prepared.geometry.to_input(box.x * fx, box.y * fy, box.w * fx, box.h * fy)
        visible = clip_box(full, prepared.crop.shape)
        if visible is None:
            outside += 1
            continue
        items.append((prepared, LABELS.index(box.label), full, visible))
    return items, outside


def _score_box(prepared: Prepared, cls: int, full: tuple, visible: tuple, grid: np.ndarray, heat: np.ndarray,
               logit: torch.Tensor, cam_threshold: float) -> tuple[dict, tuple[int, int, int, int] | None]:
    """One box's record (pointing hit, map box, IoU) and the map's box."""
    size = prepared.crop.shape
    peak = peak_point(grid, size)
    predicted = map_box(heat, cam_threshold)
    area = (full[2] - full[0]) * (full[3] - full[1])
    seen = (visible[2] - visible[0]) * (visible[3] - visible[1])
    hit = peak is not None and visible[0] <= peak[0] <= visible[2] and visible[1] <= peak[1] <= visible[3]
    row = {
        "image": prepared.path.name,
        "finding": LABELS[cls],
        "probability": float(torch.sigmoid(logit[cls])),
        "box": [round(v, 3) for v in visible],
        "visible_fraction": seen / area if area > 0 else 0.0,
        "box_area_fraction": seen / (size[0] * size[1]),
        "peak": None if peak is None else [round(v, 3) for v in peak],
        "hit": bool(hit),
        "map_box": None if predicted is None else list(predicted),
        "iou": box_iou(visible, predicted),
    }
    return row, predicted


def _score_items(explainer: GradCam, items: list[tuple], device: torch.device, batch_size: int, cam_threshold: float,
                 out: Path | None) -> list[dict]:
    """Grad-CAM of each box's finding, in batches, scored against the box; overlays written to `out`."""
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        maps, logits = explainer(torch.stack([p.input for p, *_ in chunk]).to(device), [c for _, c, *_ in chunk])
        heat = upsample(maps, chunk[0][0].crop.shape)
        for (prepared, cls, full, visible), grid, h, logit in zip(chunk, maps, heat, logits):
            row, predicted = _score_box(prepared, cls, full, visible, grid, h, logit, cam_threshold)
            rows.append(row)
            if out is not None:
                drawn = [(visible, GT_COLOUR)] + ([(predicted, MAP_COLOUR)] if predicted else [])
                atomic_write_bytes(out / overlay_name(prepared.path, LABELS[cls]), overlay_png(prepared.crop, h, drawn))
    return rows


def _matched_boxes(boxes: str | os.PathLike | pd.DataFrame, images: Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """(the boxes of the findings Grad-CAM scores, those of the given images, the images that have one)."""
    table = _load_boxes(boxes)
    files, _ = expand_inputs(images)
    by_name = {f.name: f for f in files}
    table = table[table["label"].isin(BBOX_FINDINGS)]
    matched = table[table["image"].isin(by_name)]
    return table, matched, sorted({by_name[n] for n in matched["image"]})


def _check_localize_options(cam_threshold: float, box_frame: int) -> None:
    if not 0.0 < cam_threshold < 1.0:
        raise ChexdistError(f"cam threshold {cam_threshold} must be in (0, 1)")
    if box_frame < 0:
        raise ChexdistError(f"box frame {box_frame} must be >= 0 (0: boxes in the files' own pixels)")


def localize(
    run: Any,
    images: Iterable[str | os.PathLike],
    boxes: str | os.PathLike | pd.DataFrame,
    *,
    cam_threshold: float = 0.5,
    box_frame: int = NIH_BOX_FRAME,
    n_boot: int | None = None,
    seed: int = 0,
    level: float | None = None,
    batch_size: int = 16,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score Grad-CAM of each box's finding against the box, for the given images (files/folders).

    `run`: a run folder or a `chexdist.evaluation.inference.LoadedRun`. `boxes`: BBox_List_2017.csv
    (or its table); coordinates are pixels of a `box_frame` x `box_frame` image (NIH's 1024 PNGs) and
    are scaled to each file's size (so downsampled copies of the release work); `box_frame=0` means
    the files' own pixels. Per finding and over all: pointing-game hit rate and mean IoU of the map's
    box (region at >= `cam_threshold` of the maximum) with `level` bootstrap CIs that resample
    patients, the hit rate of a uniformly random point (`chance_hit_rate`), and the share of boxes
    with IoU >= 0.1, 0.25, 0.5. With `out_dir`, one overlay per box (box green, map box white).
    JSON-able result. `n_boot` and `level` default to the run's `eval.bootstrap` and
    `eval.ci_level`, as in evaluate.
    """
    from tqdm.auto import tqdm

    from chexdist.evaluation.inference import LoadedRun, load_run

    _check_localize_options(cam_threshold, box_frame)
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    n_boot = loaded.config.eval.bootstrap if n_boot is None else n_boot
    level = loaded.config.eval.ci_level if level is None else level
    table, matched, wanted = _matched_boxes(boxes, images)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_unique_names(wanted)

    pipeline = InputPipeline(loaded.info, loaded.transform)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded.model.to(device)
    rows: list[dict] = []
    failures: list[Failure] = []
    outside = 0
    bar = tqdm(total=len(wanted), desc="localize", unit="img", disable=None if progress else True)
    with GradCam(loaded.model) as explainer:
        for batch in iter_prepared(pipeline, wanted, batch_size):
            bar.update(len(batch))
            items = []
            for prepared in batch:
                if isinstance(prepared, Failure):
                    failures.append(prepared)
                    continue
                found, lost = _box_items(prepared, matched, box_frame)
                items += found
                outside += lost
            rows += _score_items(explainer, items, device, batch_size, cam_threshold, out)
    bar.close()
    _, resampled = _groups([r["image"] for r in rows])
    return {
        "run": str(loaded.run_dir or loaded.weights),
        "arch": loaded.info["arch"],
        "target_layer": explainer.layer_name,
        "cam_threshold": cam_threshold,
        "box_frame": box_frame,
        "input_size": list(pipeline.center.size),
        "n_boot": n_boot,
        "level": level,
        "seed": seed,
        "resampled": resampled,
        "boxes_scored": len(rows),
        "boxes_outside_crop": outside,
        "boxes_without_image": int(len(table) - len(matched)),
        "failures": [f.as_dict() for f in failures],
        "per_finding": {name: _summary([r for r in rows if r["finding"] == name], n_boot, seed, level) for name in BBOX_FINDINGS},
        "overall": _summary(rows, n_boot, seed, level),
        "records": rows,
    }


BOX_COLUMNS = ("image", "finding", "probability", "hit", "iou", "visible_fraction", "box", "peak", "map_box")


def write_localization(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """`localization.json` (the report without per-box records) and `localization_boxes.csv` (one row
    per box; coordinates in input pixels, space-separated). Returns the JSON's path."""
    import csv

    from chexdist.utils.fileio import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(BOX_COLUMNS)
    for r in report["records"]:
        writer.writerow([" ".join(map(str, r[c])) if isinstance(r[c], list) else r[c] for c in BOX_COLUMNS])
    atomic_write_text(out / "localization_boxes.csv", buf.getvalue())
    atomic_write_json(out / "localization.json", {k: v for k, v in report.items() if k != "records"})
    return out / "localization.json"


def format_localization(report: dict[str, Any]) -> str:
    """Per-finding table: boxes, pointing hit rate [CI], chance, mean IoU [CI]."""
    lines = [f"{'finding':20s}{'boxes':>6s}{'pointing [95% CI]':>24s}{'chance':>8s}{'IoU [95% CI]':>24s}"]
    for name, s in [*report["per_finding"].items(), ("all", report["overall"])]:
        if not s["boxes"]:
            lines.append(f"{name:20s}{0:6d}{'-':>24s}")
            continue
        pointing = f"{s['pointing_hit_rate']:.3f} [{s['pointing_ci'][0]:.3f}, {s['pointing_ci'][1]:.3f}]"
        iou = f"{s['iou_mean']:.3f} [{s['iou_ci'][0]:.3f}, {s['iou_ci'][1]:.3f}]"
        lines.append(f"{name:20s}{s['boxes']:6d}{pointing:>24s}{s['chance_hit_rate']:8.3f}{iou:>24s}")
    lines.append(f"{report['boxes_scored']} boxes scored, {report['boxes_outside_crop']} outside the input crop left out, "
                 f"CIs resample {report['resampled']} ({report['n_boot']}x)")
    return "\n".join(lines)
