"""Model factory and weight loading with real files: chexdist safetensors, the public CheXNet format,
ImageNet-style backbones. No downloads: every checkpoint is written by the test itself."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from chexdist.errors import ChexdistError
from chexdist.labels import LABELS
from chexdist.models.arch import fixed_input_size, gradcam_target_layer, resolve_normalization
from chexdist.models.factory import create_model
from chexdist.models.weights import import_chexnet_state_dict, load_pretrained, save_weights

torch.set_num_threads(1)
TINY = "test_resnet"


def _x(n: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running stats so eval-mode outputs depend on every buffer being loaded."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_densenet121_torchvision_layout() -> None:
    model = create_model("densenet121")
    assert isinstance(model, torchvision.models.DenseNet)
    assert model.classifier.weight.shape == (14, 1024)
    assert "features.denseblock1.denselayer1.norm1.weight" in model.state_dict()
    model.eval()
    with torch.no_grad():
        assert model(_x()).shape == (1, 14)
    assert gradcam_target_layer(model) is model.features


def test_timm_model_linear_and_dense_bn_heads() -> None:
    model = create_model(TINY, num_classes=14, drop_rate=0.2)
    assert model(_x(2, 32)).shape == (2, 14)
    assert gradcam_target_layer(model) is model.layer4

    dense = create_model(TINY, head="dense_bn", drop_rate=0.3)
    layers = [type(m) for m in dense.fc]
    assert layers == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert dense.fc[0].in_features == dense.num_features and dense.fc[3].p == 0.3
    assert dense.fc[-1].out_features == 14
    dense.train()
    out = dense(_x(2, 32))
    assert out.shape == (2, 14)
    out.sum().backward()
    assert dense.fc[0].weight.grad is not None


def test_densenet121_dense_bn_head_and_dropout() -> None:
    model = create_model("densenet121", head="dense_bn", num_classes=3)
    assert model.classifier[0].in_features == 1024 and model.classifier[-1].out_features == 3
    model.eval()
    with torch.no_grad():
        assert model(_x()).shape == (1, 3)
    dropped = create_model("densenet121", drop_rate=0.5)
    assert set(dropped.classifier.state_dict()) == {"weight", "bias"}
    feats = torch.ones(4, 1024)
    dropped.classifier.train()
    assert not torch.equal(dropped.classifier(feats), dropped.classifier.eval()(feats))


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ChexdistError, match=r"unknown architecture 'densenet12'.*timm.list_models"):
        create_model("densenet12")
    with pytest.raises(ChexdistError, match="never downloads"):
        create_model("timm/efficientnet_b0.ra_in1k")
    with pytest.raises(ChexdistError, match="model.head"):
        create_model(TINY, head="mlp")
    with pytest.raises(ChexdistError, match="model.drop_rate"):
        create_model(TINY, drop_rate=1.5)


def test_missing_or_remote_pretrained_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "densenet121.safetensors"
    with pytest.raises(ChexdistError, match=r"model.pretrained: .*not found; download densenet121 ImageNet weights to"):
        create_model("densenet121", pretrained=missing)
    for remote in ("https://download.pytorch.org/models/densenet121-a639ec97.pth", "timm/resnet18.a1_in1k", "hf-hub:timm/x"):
        with pytest.raises(ChexdistError, match="never downloads"):
            create_model(TINY, pretrained=remote)
    pickled = tmp_path / "module.pth"
    torch.save({"model": create_model(TINY)}, pickled)
    with pytest.raises(ChexdistError, match="weights_only"):
        create_model(TINY, pretrained=pickled)


def test_chexdist_safetensors_round_trip(tmp_path: Path) -> None:
    source = _randomize_bn(create_model(TINY, head="dense_bn"))
    path = tmp_path / "best.safetensors"
    save_weights(source, path, metadata={"epoch": "3"})
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = create_model(TINY, head="dense_bn", pretrained=path)
    assert loaded.pretrained_report["classifier_reinitialized"] is False
    assert loaded.pretrained_report["reinitialized"] == []
    _same_outputs(source, loaded, _x(2, 32))

    with pytest.raises(ChexdistError, match="does not fit resnet10t"):
        create_model("resnet10t", pretrained=path)


def test_label_order_in_metadata_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "swapped.safetensors"
    save_weights(create_model(TINY), path, labels=[LABELS[1], LABELS[0], *LABELS[2:]])
    with pytest.raises(ChexdistError, match="label order differs"):
        create_model(TINY, pretrained=path)


def _to_public_chexnet_format(sd: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """What arnoweng/CheXNet's model.pth.tar holds: DataParallel('densenet121' attribute) keys,
    pre-0.4 torchvision layer names, Sequential(Linear, Sigmoid) classifier, no num_batches_tracked."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        key = key.replace("classifier.", "classifier.0.")
        out["module.densenet121." + key] = value.clone()
    return out


def test_public_chexnet_checkpoint_imports_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torchvision.models.densenet121(weights=None)
    source.classifier = nn.Linear(1024, 14)
    _randomize_bn(source)
    public = _to_public_chexnet_format(source.state_dict())
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in public
    assert "module.densenet121.classifier.0.weight" in public
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "arch": "densenet121", "state_dict": public}, path)

    model = create_model("densenet121", pretrained=path)
    report = model.pretrained_report
    assert report["source"] == "chexnet" and report["classifier_reinitialized"] is False
    _same_outputs(source, model, _x())

    remapped = import_chexnet_state_dict({"state_dict": public})
    assert set(remapped) == {k for k in source.state_dict() if not k.endswith("num_batches_tracked")}

    del public["module.densenet121.features.denseblock4.denselayer16.conv.2.weight"]
    torch.save({"state_dict": public}, path)
    with pytest.raises(ChexdistError, match="missing features.denseblock4.denselayer16.conv2.weight"):
        create_model("densenet121", pretrained=path)


def test_imagenet_backbone_loads_and_reports_classifier(tmp_path: Path) -> None:
    imagenet = _randomize_bn(torchvision.models.densenet121(weights=None))
    assert imagenet.classifier.out_features == 1000
    modern = tmp_path / "densenet121-imagenet.pth"
    torch.save(imagenet.state_dict(), modern)
    legacy = tmp_path / "densenet121-a639ec97.pth"  # torchvision's own download keeps pre-0.4 names
    torch.save({re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in imagenet.state_dict().items()}, legacy)
    for head, path, source in (("linear", legacy, "torchvision_legacy"), ("dense_bn", modern, "state_dict")):
        model = create_model("densenet121", pretrained=path, head=head)
        report = model.pretrained_report
        assert report["source"] == source
        assert report["classifier_reinitialized"] is True
        assert "classifier.weight" in report["reinitialized"] or "classifier.0.weight" in report["reinitialized"]
        assert "random init" in report["message"]
        torch.testing.assert_close(model.features.conv0.weight, imagenet.features.conv0.weight, rtol=0, atol=0)
        model.eval(), imagenet.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.features(_x()), imagenet.features(_x()), rtol=0, atol=0)

    timm_imagenet = create_model(TINY, num_classes=1000)
    timm_path = tmp_path / "test_resnet.safetensors"
    save_weights(timm_imagenet, timm_path)
    fresh = create_model(TINY)
    report = load_pretrained(fresh, timm_path)
    assert report["reinitialized"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(fresh.conv1[0].weight, timm_imagenet.conv1[0].weight, rtol=0, atol=0)


def test_fixed_input_size() -> None:
    assert fixed_input_size("densenet121") is None
    assert fixed_input_size("efficientnet_b0") is None
    assert fixed_input_size("vit_base_patch16_224") == 224


def test_config_refuses_a_size_the_architecture_cannot_take() -> None:
    from chexdist.config import load_config

    assert load_config("vit").data.image_size == 224
    with pytest.raises(ChexdistError, match=r"^config key 'data.image_size': 512 px does not fit model.name "
                                            r"'vit_base_patch16_224', which takes 224 px inputs only; set data.image_size=224"):
        load_config("vit", overrides=["data.image_size=512", "data.eval_resize=576"])
    assert load_config("chexnet", overrides=["data.image_size=512", "data.eval_resize=576"]).data.image_size == 512


def test_normalization_comes_from_the_model() -> None:
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert resolve_normalization("densenet121") == imagenet
    assert resolve_normalization("efficientnet_b0") == imagenet
    assert resolve_normalization("vit_base_patch16_224") == half
    assert resolve_normalization(create_model("densenet121")) == imagenet
    assert resolve_normalization(create_model(TINY, head="dense_bn")) == resolve_normalization(TINY) == half
    assert resolve_normalization() == imagenet
    assert resolve_normalization("vit_base_patch16_224", given={"mean": (0.1,) * 3, "std": [1, 1, 1]}) == {
        "mean": [0.1] * 3, "std": [1.0] * 3}  # what the run recorded wins over the architecture's
    with pytest.raises(ChexdistError, match=r"^normalization \{'mean': \[0.5\]\}: expected"):
        resolve_normalization(TINY, given={"mean": [0.5]})

    from chexdist.data.transforms import build_transform

    white = torch.full((1, 80, 80), 255, dtype=torch.uint8)
    vit = build_transform("none", image_size=64, eval_resize=72, train=False, normalization=half)(white)
    assert torch.allclose(vit, torch.ones(3, 64, 64))  # (1 - 0.5) / 0.5
    dense = build_transform("none", image_size=64, eval_resize=72, train=False, normalization=imagenet)(white)
    expected = (1 - torch.tensor(imagenet["mean"])) / torch.tensor(imagenet["std"])
    assert torch.allclose(dense[:, 0, 0], expected)


def test_architecture_facts_and_config_import_neither_torch_nor_timm() -> None:
    code = ("import sys, chexdist.models.arch, chexdist.config; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
