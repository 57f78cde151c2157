"""`chexdist export`: one ONNX file with a dynamic batch whose onnxruntime logits match PyTorch's
on the same preprocessed batch at two batch sizes, the preprocessing/labels/thresholds beside it,
a torch.export program that loads and matches, and `predict --backend onnx` giving the findings of
the PyTorch path on real X-rays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chexdist.cli import main as cli
from chexdist.evaluation.inference import load_run
from chexdist.evaluation.inputs import InputPipeline
from tests.conftest import REAL_IMAGES

pytest.importorskip("onnxruntime")
RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert cli.main(["export", "--run", str(trained_run), "--format", "onnx", "--out", str(out)]) == 0
    assert cli.main(["export", "--run", str(trained_run), "--format", "pt2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def batch(trained_run, real_data):
    """Five real X-rays prepared exactly as predict prepares them."""
    loaded = load_run(trained_run)
    pipeline = InputPipeline(loaded.info, loaded.transform)
    return torch.stack([pipeline(p).input for p in sorted(REAL_IMAGES.glob("*.png"))[:5]])


def test_onnx_is_one_file_with_the_run_beside_it(trained_run, exported):
    import onnx

    assert sorted(p.name for p in exported.iterdir()) == ["model.onnx", "model.onnx.json", "model.pt2", "model.pt2.json"]
    model = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch dimension is symbolic"
    best = json.loads((trained_run / "best.json").read_text())
    beside = json.loads((exported / "model.onnx.json").read_text())
    meta = json.loads({p.key: p.value for p in model.metadata_props}["chexdist"])
    for info in (beside, meta):
        assert info["labels"] == best["labels"] and info["thresholds"] == best["thresholds"]
        assert info["preprocessing"]["center_crop"] == [128, 128] and info["preprocessing"]["resize_shorter"] == 144
        assert info["preprocessing"]["normalization"] == best["normalization"]


@pytest.mark.parametrize("size", [1, 5])
def test_onnxruntime_matches_pytorch(trained_run, exported, batch, size):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    x = batch[:size]
    ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        reference = load_run(trained_run).model(x).numpy()
    assert ours.shape == (size, 14)
    np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=ATOL)
    assert np.ptp(reference, axis=0).max() > 1e-3 or size == 1, "the rows differ (a constant model matches trivially)"


def test_pt2_program_loads_and_matches(trained_run, exported, batch):
    program = torch.export.load(str(exported / "model.pt2")).module()
    with torch.no_grad():
        reference = load_run(trained_run).model(batch)
        for size in (2, 5):
            torch.testing.assert_close(program(batch[:size]), reference[:size], rtol=RTOL, atol=ATOL)


def test_predict_backend_onnx_gives_the_pytorch_findings(trained_run, exported, tmp_path, real_data):
    images = [str(p) for p in sorted(REAL_IMAGES.glob("*.png"))[:12]]
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.json"
        args = ["predict", "--run", str(trained_run), *images, "--quiet", "--out", str(out), "--backend", backend]
        assert cli.main(args + (["--onnx", str(exported / "model.onnx")] if backend == "onnx" else [])) == 0
        outs[backend] = json.loads(out.read_text())["predictions"]
    assert [r["positive"] for r in outs["onnx"]] == [r["positive"] for r in outs["torch"]]
    assert any(r["positive"] for r in outs["torch"])
    for a, b in zip(outs["onnx"], outs["torch"]):
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), rtol=RTOL, atol=ATOL)
    assert cli.main(["predict", "--run", str(trained_run), images[0], "--backend", "onnx", "--cam", str(tmp_path / "c"),
                     "--onnx", str(exported / "model.onnx")]) == 2, "Grad-CAM stays on the PyTorch path"


def test_onnx_backend_never_calls_the_torch_model(trained_run, exported, real_data):
    from chexdist.evaluation.predict import predict_files

    loaded = load_run(trained_run)

    def refuse(*_):
        raise AssertionError("the torch model ran")

    loaded.model.register_forward_pre_hook(refuse)
    result = predict_files(loaded, sorted(REAL_IMAGES.glob("*.png"))[:3], progress=False, backend="onnx",
                           onnx_model=exported / "model.onnx")
    assert len(result.records) == 3 and not result.failures
