"""An exported run as deployable files: ONNX (the dynamo exporter, one self-contained file, dynamic
batch) or a torch.export program (`.pt2`), each with `<file>.json` beside it holding what a runtime
needs besides the graph: the preprocessing (pack resize, eval Resize + CenterCrop, normalization),
the labels and the val-tuned thresholds. The ONNX file also carries them as metadata properties.

Grad-CAM is not exported: it needs autograd, so it stays on the PyTorch path. `OnnxModel` runs the
ONNX file in onnxruntime (CPU provider) for `chexdist predict --backend onnx`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_json

FORMATS = ("onnx", "pt2")
EXPORT_DIR = "export"
FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
INPUT_NAME, OUTPUT_NAME = "image", "logits"
MAX_BATCH = 4096


def info_name(fmt: str) -> str:
    """The JSON beside the model file: `model.onnx.json` / `model.pt2.json`."""
    return FILES[fmt] + ".json"


def _shorter_side(size: Any) -> Any:
    """torchvision keeps Resize(144) as [144]: the shorter side; (h, w) stays a pair."""
    if isinstance(size, int):
        return size
    return int(size[0]) if len(size) == 1 else [int(v) for v in size]


def preprocessing(loaded: Any) -> dict[str, Any]:
    """How a file becomes the model's float input, as `chexdist.evaluation.inputs` does it."""
    from chexdist.evaluation.inputs import InputPipeline

    pipeline = InputPipeline(loaded.info, loaded.transform)
    norm = loaded.info.get("normalization") or {}
    return {
        "decode": "8-bit grayscale (chexdist.data.images.load_gray8)",
        "pack_resize_shorter": pipeline.size or None,
        "pack_format": pipeline.format,
        "resize_shorter": _shorter_side(pipeline.resize.size),
        "center_crop": list(pipeline.center.size),
        "channels": "gray replicated to 3",
        "scale": "x / 255",
        "normalization": {"mean": list(norm.get("mean", [])), "std": list(norm.get("std", []))},
        "input": f"{INPUT_NAME}: float32 [batch, 3, {pipeline.center.size[0]}, {pipeline.center.size[1]}]",
        "output": f"{OUTPUT_NAME}: float32 [batch, {len(loaded.info['labels'])}] (sigmoid gives probabilities)",
    }


def export_info(loaded: Any, fmt: str) -> dict[str, Any]:
    info = loaded.info
    return {
        "format": fmt,
        "file": FILES[fmt],
        "arch": info["arch"],
        "labels": list(info["labels"]),
        "thresholds": {k: float(v) for k, v in info["thresholds"].items()},
        "preprocessing": preprocessing(loaded),
        "chexdist_version": info.get("chexdist_version"),
        "source": str(loaded.weights),
    }


def example_input(loaded: Any, batch: int = 2) -> torch.Tensor:
    """A batch of the model's input shape (batch 2: torch.export specializes a dimension seen as 1)."""
    h, w = (int(v) for v in preprocessing(loaded)["center_crop"])
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, target: Path, metadata: dict[str, str]) -> None:
    """One ONNX file (weights inside, not external data) with a dynamic batch dimension."""
    import onnx

    tmp = target.with_name(f".tmp-{target.name}")
    program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, dynamic_shapes=_dynamic_batch(),
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, target)


def export_pt2(model: torch.nn.Module, example: torch.Tensor, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(tmp))
    os.replace(tmp, target)


def export_run(run: Any, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Write `out`/model.onnx or model.pt2 and its JSON (`info_name`; default out: RUN/export); returns
    the model file's path. `run`: a run folder or a LoadedRun."""
    from chexdist.evaluation.inference import LoadedRun, load_run

    if fmt not in FORMATS:
        raise ChexdistError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    if out is None and loaded.run_dir is None:
        raise ChexdistError("give --out DIR: the model was loaded from a file, not a run folder")
    out_dir = Path(out) if out is not None else loaded.run_dir / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model.cpu().eval()
    info = export_info(loaded, fmt)
    target = out_dir / FILES[fmt]
    example = example_input(loaded)
    with torch.no_grad():
        if fmt == "onnx":
            meta = {"chexdist": json.dumps(info)}
            export_onnx(model, example, target, meta)
        else:
            export_pt2(model, example, target)
    atomic_write_json(out_dir / info_name(fmt), info)
    return target


class OnnxModel:
    """The exported ONNX file in onnxruntime's CPU provider, called like the torch model on a
    preprocessed float batch (a tensor in, logits as a tensor out; numpy inside)."""

    def __init__(self, path: str | os.PathLike, labels: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ChexdistError(f"{path}: no ONNX model; write it with chexdist export --run RUN --format onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = json.loads(meta["chexdist"]) if "chexdist" in meta else {}
        if labels is not None and self.info.get("labels", labels) != list(labels):
            raise ChexdistError(f"{path}: its labels differ from the run's best.json; export the run again")
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def for_run(cls, loaded: Any, path: str | os.PathLike | None = None) -> OnnxModel:
        if path is None:
            if loaded.run_dir is None:
                raise ChexdistError("--backend onnx: give --onnx FILE (the model was not loaded from a run folder)")
            path = loaded.run_dir / EXPORT_DIR / FILES["onnx"]
        return cls(path, list(loaded.info["labels"]))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.logits(batch.detach().cpu().numpy()))
