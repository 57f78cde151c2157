"""Predictions for image files with an exported run: probabilities, the findings at or above the
run's val-tuned thresholds, warnings for inputs unlike the training data, and optional Grad-CAM
overlays of those findings. Files are prepared exactly as packing prepared the training images
(`inputs.InputPipeline`), batched, and a file that cannot be read is listed, never dropped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_text
from chexdist.evaluation.inputs import Failure, InputPipeline, expand_inputs, iter_prepared
from chexdist.labels import canonical_name
from chexdist.evaluation.metrics import threshold_array

FORMATS = ("json", "csv")
BACKENDS = ("torch", "onnx")


@dataclass
class PredictResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    statistics_recorded: bool = True


def predict_files(
    run: Any,
    inputs: Iterable[str | os.PathLike],
    *,
    batch_size: int = 16,
    cam_dir: str | os.PathLike | None = None,
    cam_finding: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    backend: str = "torch",
    onnx_model: str | os.PathLike | None = None,
) -> PredictResult:
    """One record per readable file: {image, probabilities (label -> p), positive (labels with
    p >= threshold), warnings, and with `cam_dir` the overlays written (`cam`) and the findings whose
    map is all zero (`cam_empty`)}. `cam_finding` forces the Grad-CAM finding instead of the positive
    ones. The progress bar shows for folders on a terminal. `backend="onnx"` runs the model exported by
    `chexdist export --format onnx` (`onnx_model`, default RUN/export/model.onnx) in onnxruntime;
    the preparation of the files is the same, Grad-CAM needs the torch backend."""
    from tqdm.auto import tqdm

    from chexdist.evaluation.inference import LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    labels = list(loaded.info["labels"])
    forced = labels.index(canonical_name(cam_finding, where="--finding")) if cam_finding else None
    if forced is not None and cam_dir is None:
        raise ChexdistError("--finding chooses the Grad-CAM finding; give --cam DIR (or use chexdist cam)")
    thresholds = torch.from_numpy(threshold_array(loaded.thresholds, labels))
    files, folder = expand_inputs(inputs)
    pipeline = InputPipeline(loaded.info, loaded.transform)
    if backend not in BACKENDS:
        raise ChexdistError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" and cam_dir is not None:
        raise ChexdistError("Grad-CAM needs autograd: use --backend torch with --cam (the ONNX model has no gradients)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "onnx":
        from chexdist.evaluation.export import OnnxModel

        model, device = OnnxModel.for_run(loaded, onnx_model), torch.device("cpu")
    else:
        model = loaded.model.to(device).eval()
    explainer = None
    if cam_dir is not None:
        from chexdist.evaluation.cam import GradCam, check_unique_names, write_overlays

        check_unique_names(files)
        explainer = GradCam(model)
    result = PredictResult(labels=labels, statistics_recorded=pipeline.reference is not None)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None if (progress and folder) else True)
    try:
        for batch in iter_prepared(pipeline, files, batch_size):
            bar.update(len(batch))
            ready = [p for p in batch if not isinstance(p, Failure)]
            result.failures += [p.as_dict() for p in batch if isinstance(p, Failure)]
            if not ready:
                continue
            with torch.no_grad():
                probs = torch.sigmoid(model(torch.stack([p.input for p in ready]).to(device)).float()).cpu()
            cams: list[tuple[Any, int]] = []
            owners: list[dict[str, Any]] = []
            for prepared, p in zip(ready, probs):
                positive = (p >= thresholds).nonzero().flatten().tolist()
                record = {
                    "image": str(prepared.path),
                    "probabilities": dict(zip(labels, p.tolist())),
                    "positive": [labels[i] for i in positive],
                    "warnings": prepared.warnings,
                }
                result.records.append(record)
                for c in [forced] if forced is not None else positive:
                    cams.append((prepared, c))
                    owners.append(record)
                if explainer is not None:
                    record["cam"], record["cam_empty"] = [], []
            if explainer is not None and cams:
                paths = write_overlays(explainer, cams, Path(cam_dir), batch_size)
                for record, (_, cls), path in zip(owners, cams, paths):
                    if path is None:
                        record["cam_empty"].append(labels[cls])
                        continue
                    record["cam"].append(str(path))
                    result.overlays.append(str(path))
    finally:
        bar.close()
        if explainer is not None:
            explainer.close()
    return result


def format_records(result: PredictResult, fmt: str) -> str:
    """JSON: {"predictions": [...], "failures": [...]}; CSV: image, one column per label, positive
    (`|`-joined), warnings (`; `-joined), cam."""
    if fmt not in FORMATS:
        raise ChexdistError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"predictions": result.records, "failures": result.failures}, indent=1) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *result.labels, "positive", "warnings", "cam"])
    for r in result.records:
        writer.writerow([r["image"], *(repr(r["probabilities"][k]) for k in result.labels), "|".join(r["positive"]),
                         "; ".join(r["warnings"]), "|".join(r.get("cam", []))])
    return buf.getvalue()


def write_records(result: PredictResult, fmt: str, out: str | os.PathLike | None) -> None:
    text = format_records(result, fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
