"""Config: recipes match the papers, precedence, coercion, refusals and round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chexdist.config import (
    Config,
    apply_overrides,
    available_recipes,
    config_from_dict,
    config_keys,
    config_to_dict,
    dump_config,
    eval_crop_warning,
    load_config,
    parse_yaml,
    save_config,
    validate_config,
)
from chexdist.errors import ChexdistError

# DESIGN.md, "Names that other tools rely on": scripts, tune spaces and notebooks use these.
STABLE_KEYS = """
data.shards data.image_size data.batch_size data.num_workers model.name model.pretrained loss.name
loss.gamma loss.alpha optim.name optim.lr optim.weight_decay optim.momentum sched.name sched.patience
sched.factor aug.preset train.epochs train.precision train.grad_accum train.early_stop_patience
train.seed train.checkpoint_every eval.threshold_metric
""".split()

STABLE_CHOICES = {
    "loss.name": {"bce", "wbce", "focal"},
    "optim.name": {"adam", "adamw", "sgd"},
    "sched.name": {"plateau", "cosine", "step", "none"},
}

PAPER_VALUES = {
    "chexnet": {
        "model.name": "densenet121", "loss.name": "bce", "optim.name": "adam", "optim.lr": 1e-3,
        "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.0, "data.batch_size": 16,
        "sched.name": "plateau", "sched.factor": 0.1, "sched.patience": 1, "aug.preset": "flip",
        "data.image_size": 224, "data.crop_pct": 0.875, "train.precision": "no", "train.epochs": 20,
    },
    "dannynet": {
        "model.name": "densenet121", "loss.name": "focal", "loss.alpha": 1.0, "loss.gamma": 2.0,
        "optim.name": "adamw", "optim.lr": 5e-5, "optim.weight_decay": 1e-5, "sched.name": "plateau",
        "sched.factor": 0.1, "sched.patience": 1, "data.batch_size": 8, "train.epochs": 25,
        "train.early_stop_patience": 5, "aug.preset": "dannynet", "aug.brightness": 0.1,
        "aug.contrast": 0.1, "data.image_size": 224, "eval.threshold_metric": "f1",
    },
    "efficientnet": {
        "model.name": "efficientnet_b0", "model.head": "dense_bn", "loss.name": "bce",
        "optim.name": "adam", "optim.lr": 1e-3, "aug.preset": "flip",
    },
    "vit": {
        "model.name": "vit_base_patch16_224", "optim.name": "adam", "optim.lr": 1e-4,
        "loss.name": "bce", "aug.preset": "flip", "data.image_size": 224,
    },
    "tiny": {
        "model.name": "test_resnet", "data.image_size": 64, "data.crop_pct": 0.875,
        "data.batch_size": 16, "train.epochs": 3, "optim.name": "adam", "optim.lr": 1e-3,
        "loss.name": "bce", "aug.preset": "flip", "data.num_workers": 0,
    },
}


def get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_shipped_recipes_load_and_validate():
    assert set(available_recipes()) >= {"chexnet", "dannynet", "efficientnet", "vit", "tiny"}
    for name in available_recipes():
        cfg = load_config(name)
        assert cfg.recipe == name
        assert validate_config(cfg) == load_config(name)
        text = (Path(__file__).parents[1] / "chexdist" / "recipes" / f"{name}.yaml").read_text()
        assert text.startswith("#"), f"{name}.yaml must open with a comment naming its source"


@pytest.mark.parametrize("recipe", sorted(PAPER_VALUES))
def test_recipe_values_match_the_papers(recipe):
    cfg = load_config(recipe)
    for dotted, expected in PAPER_VALUES[recipe].items():
        value = get(cfg, dotted)
        assert value == expected and type(value) is type(expected), (recipe, dotted, value)


def test_stable_names_exist_with_their_choices():
    assert set(STABLE_KEYS) <= set(config_keys())
    cfg = Config()
    for dotted in STABLE_KEYS:
        get(cfg, dotted)
    for dotted, choices in STABLE_CHOICES.items():
        for choice in choices:
            assert get(apply_overrides(cfg, [f"{dotted}={choice}"]), dotted) == choice
    assert get(apply_overrides(cfg, ["train.precision=bf16"]), "train.precision") == "bf16"


def test_precedence_defaults_recipe_file_set(tmp_path):
    assert load_config().optim.lr == Config().optim.lr == 1e-3
    assert load_config("dannynet").optim.lr == 5e-5
    file = tmp_path / "mine.yaml"
    file.write_text("optim:\n  lr: 2e-5\n  weight_decay: 0.01\ntrain:\n  epochs: 7\n")
    cfg = load_config("dannynet", file)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs) == (2e-5, 0.01, 7)
    assert cfg.optim.name == "adamw" and cfg.loss.name == "focal"
    cfg = load_config("dannynet", file, ["optim.lr=3e-6", "train.epochs=2"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs) == (3e-6, 0.01, 2)
    assert cfg.recipe == "dannynet"


def test_recipe_given_as_a_path(tmp_path):
    path = tmp_path / "found.yaml"
    path.write_text("recipe: something-else\nmodel: {name: resnet18}\n")
    cfg = load_config(str(path))
    assert cfg.recipe == "found" and cfg.model.name == "resnet18"


def test_override_coercion():
    cfg = load_config("chexnet", overrides=[
        "optim.lr=1e-4", "optim.weight_decay=0", "model.pretrained=null", "optim.betas=[0.9, 0.99]",
        "train.deterministic=true", "train.precision=no", "data.shards=2024", "train.epochs=4.0",
        "loss.alpha=0.25", "loss.name=FOCAL",
    ])
    assert cfg.optim.lr == 0.0001 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert cfg.model.pretrained is None
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.deterministic is True
    assert cfg.train.precision == "no"
    assert cfg.data.shards == "2024"
    assert cfg.train.epochs == 4 and type(cfg.train.epochs) is int
    assert cfg.loss.alpha == 0.25 and cfg.loss.name == "focal"
    assert load_config(overrides=["model.pretrained=weights/x.pth"]).model.pretrained == "weights/x.pth"
    assert load_config(overrides=["data.shards="]).data.shards == ""


def test_yaml_file_scalars_are_yaml_1_2(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("optim:\n  lr: 1e-4\ntrain:\n  precision: no\n  deterministic: true\n")
    cfg = load_config(config_file=file)
    assert cfg.optim.lr == 1e-4 and cfg.train.precision == "no" and cfg.train.deterministic is True
    assert parse_yaml("[no, bf16, 1e-3]") == ["no", "bf16", 1e-3]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lrr=1", ["'optim.lrr'", "optim keys: name, lr,", "did you mean 'optim.lr'"]),
        ("optm.lr=1", ["'optm.lr'", "sections: data, model"]),
        ("loss.name=foo", ["'loss.name'", "'foo' is not one of bce, wbce, focal"]),
        ("sched.name=linear", ["'sched.name'", "plateau, cosine, step, none"]),
        ("train.epochs=2.5", ["'train.epochs'", "integer"]),
        ("train.epochs=0", ["'train.epochs'", ">= 1"]),
        ("optim.lr=0", ["'optim.lr'", "> 0"]),
        ("optim.lr=-1e-3", ["'optim.lr'", "> 0"]),
        ("optim.lr=fast", ["'optim.lr'", "number"]),
        ("data.batch_size=0", ["'data.batch_size'", ">= 1"]),
        ("model.drop_rate=1.0", ["'model.drop_rate'", "< 1"]),
        ("train.grad_accum=0", ["'train.grad_accum'", ">= 1"]),
        ("optim.betas=[0.9]", ["'optim.betas'", "2 values"]),
        ("optim.betas=[0.9, 1.5]", ["'optim.betas'", "< 1"]),
        ("train.deterministic=maybe", ["'train.deterministic'", "true or false"]),
        ("model.name=", ["'model.name'", "empty"]),
        ("data.eval_resize=200", ["'data.eval_resize'", "data.image_size", "crop_pct"]),
        ("data.crop_pct=1.2", ["'data.crop_pct'", "<= 1"]),
        ("sched.min_lr=0.1", ["'sched.min_lr'", "optim.lr"]),
        ("sched.warmup_epochs=2", ["'sched.warmup_epochs'", "plateau"]),
        ("optim.lr", ["malformed", "section.key=value"]),
        ("lr=1e-4", ["malformed", "section.key=value"]),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(override, fragments):
    with pytest.raises(ChexdistError) as info:
        load_config("chexnet", overrides=[override])
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_files_are_refused_naming_the_file(tmp_path):
    cases = {
        "unknown_key.yaml": ("optim:\n  lrr: 1\n", "unknown config key 'optim.lrr'"),
        "unknown_section.yaml": ("optimizer:\n  lr: 1\n", "unknown config section 'optimizer'"),
        "bad_enum.yaml": ("loss:\n  name: foo\n", "'foo' is not one of bce, wbce, focal"),
        "flat.yaml": ("optim: 1e-3\n", "config section 'optim' must be a mapping"),
        "list.yaml": ("- 1\n- 2\n", "expected a mapping of sections"),
        "broken.yaml": ("optim:\n  lr: [1,\n", "line"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ChexdistError) as info:
            load_config("tiny", path)
        message = str(info.value)
        assert name in message and fragment in message and "\n" not in message, message
    with pytest.raises(ChexdistError, match="not found"):
        load_config(config_file=tmp_path / "missing.yaml")


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ChexdistError, match="unknown recipe 'chexnett'.*did you mean 'chexnet'.*dannynet"):
        load_config("chexnett")
    with pytest.raises(ChexdistError, match="recipe file not found"):
        load_config("nowhere/recipe.yaml")


def test_apply_overrides_mapping_returns_a_validated_copy():
    base = load_config("tiny")
    trial = apply_overrides(base, {"optim.lr": 3e-4, "loss.name": "focal", "data.batch_size": 32})
    assert (trial.optim.lr, trial.loss.name, trial.data.batch_size) == (3e-4, "focal", 32)
    assert base == load_config("tiny")
    with pytest.raises(ChexdistError, match="'optim.lr'"):
        apply_overrides(base, {"optim.lr": -1.0})
    with pytest.raises(ChexdistError, match="'train.precision'.*quote"):
        apply_overrides(base, {"train.precision": False})


def test_dict_round_trip_and_restore():
    cfg = load_config("dannynet", overrides=["train.seed=3", "model.pretrained=/w/densenet.pth"])
    d = config_to_dict(cfg)
    assert list(d)[0] == "recipe" and d["recipe"] == "dannynet"
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    partial = {"recipe": "old", "optim": {"lr": 0.01}}
    restored = config_from_dict(partial)
    assert restored.optim.lr == 0.01 and restored.train == Config().train and restored.recipe == "old"
    with pytest.raises(ChexdistError, match="unknown config key 'train.epoch'"):
        config_from_dict({"train": {"epoch": 3}})


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("dannynet", overrides=["optim.betas=[0.85, 0.99]", "data.shards=shards/nih"])
    path = tmp_path / "runs" / "x" / "config.yaml"
    save_config(cfg, path)
    assert load_config(config_file=path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    assert yaml.safe_load(dump_config(cfg))["train"]["precision"] == "no"


def test_validate_config_catches_edits_in_code():
    cfg = load_config("tiny")
    cfg.train.epochs = 1.5
    with pytest.raises(ChexdistError, match="'train.epochs'"):
        validate_config(cfg)
    cfg = load_config("tiny")
    cfg.optim.lr = "1e-4"
    assert validate_config(cfg).optim.lr == 1e-4


def test_every_field_has_a_default_that_validates():
    cfg = validate_config(Config())
    assert cfg == Config() and config_from_dict(config_to_dict(cfg)) == Config()


@pytest.mark.parametrize("recipe", ["chexnet", "dannynet", "tiny"])
def test_changing_image_size_alone_keeps_the_eval_view(recipe):
    """timm's crop_pct convention: Resize floor(image_size / crop_pct), so the eval centre crop keeps
    crop_pct of each side whatever image_size is (it used to stay Resize 256 and keep 14% at 96 px)."""
    import numpy as np

    from chexdist.data.transforms import build_transform

    cfg = load_config(recipe, overrides=["data.image_size=96"])
    assert cfg.data.resolved_eval_resize == 109 == int(96 / 0.875)
    assert eval_crop_warning(cfg) is None
    image = np.zeros((512, 512), dtype=np.uint8)
    image[48:56, :] = 255  # a bright band 10% below the top edge, as far in as a clavicle
    view = build_transform(cfg.aug.preset, cfg.data.image_size, cfg.data.resolved_eval_resize, train=False)(image)
    assert view.shape == (3, 96, 96)
    assert view[0].amax(dim=1)[:12].max() > 1.0, "the band near the top edge is inside the eval view"


def test_resolved_eval_resize_is_saved_and_reloads_derived(tmp_path):
    cfg = load_config("chexnet")
    assert (cfg.data.eval_resize, cfg.data.resolved_eval_resize) == (0, 256)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["data"]["eval_resize"] == 256  # tools read the number
    resized = load_config(config_file=path, overrides=["data.image_size=128"])
    assert resized.data.resolved_eval_resize == 146  # re-derived, not the stale 256
    explicit = load_config("chexnet", overrides=["data.eval_resize=300"])
    save_config(explicit, path)
    reloaded = load_config(config_file=path)
    assert reloaded == explicit and reloaded.data.resolved_eval_resize == 300
    assert load_config("chexnet", overrides=["data.eval_resize=null"]).data.resolved_eval_resize == 256
    assert load_config("chexnet", overrides=["data.crop_pct=1.0"]).data.resolved_eval_resize == 224


def test_eval_crop_warning_names_the_setting():
    warning = eval_crop_warning(load_config("chexnet", overrides=["data.eval_resize=400"]))
    assert warning is not None and "31%" in warning and "data.eval_resize" in warning
    assert "data.crop_pct" in eval_crop_warning(load_config("chexnet", overrides=["data.crop_pct=0.6"]))
    assert eval_crop_warning(load_config("chexnet", overrides=["data.eval_resize=300"])) is None
