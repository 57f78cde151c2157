"""What the search refuses before Ray starts, and the small pieces that need no Ray."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from chexdist.cli.main import main as cli_main
from chexdist.config import load_config
from chexdist.errors import ChexdistError
from tests.tune.kit import tune_args, TINY_SPACE, FIXED


def test_a_trial_stopped_before_its_first_result_keeps_its_parameters(tmp_path):
    """Ctrl-C while a trial starts: Ray has no result (so no config) for it, only the params.json it wrote."""
    from chexdist.tuning.results import started_params
    from chexdist.tuning.space import load_space

    space = load_space(TINY_SPACE, load_config("tiny"))
    trial = tmp_path / "run_trial_abcde_00003_3"
    trial.mkdir()
    assert started_params(str(trial)) == {}
    assert space.active({}) == space.fixed
    (trial / "params.json").write_text(json.dumps({"loss.name": "bce", "loss.gamma": 2.0, "optim.name": "adam", "optim.lr": 1e-3}))
    active = space.active(started_params(str(trial)))
    assert active["loss.name"] == "bce" and active["optim.lr"] == 1e-3 and "loss.gamma" not in active


def test_replacement_is_the_oldest_newer_checkpoint():
    from chexdist.tuning.restore import replacement_for

    siblings = ["checkpoint_000004", "checkpoint_000003", "checkpoint_000001", "run", "checkpoint_000003.restoring"]
    assert replacement_for("/exp/trial/checkpoint_000002", siblings) == "checkpoint_000003"
    assert replacement_for("/exp/trial/checkpoint_000004/", siblings) is None
    assert replacement_for("/exp/trial/run", siblings) is None


BAD_SPACES = [
    ("optim.lrr: {loguniform: [1.0e-5, 1.0e-2]}\n", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optim.lr: {logunifrom: [1.0e-5, 1.0e-2]}\n", "optim.lr: expected one sampler"),
    ("optim.lr: {loguniform: [0, 1.0e-2]}\n", "optim.lr: loguniform needs low > 0"),
    ("optim.lr: {uniform: [0.1]}\n", "optim.lr: uniform takes [low, high]"),
    ("loss.name: {choice: [bce, hinge]}\n", "config key 'loss.name': 'hinge' is not one of"),
    ("loss.name: {choice: [bce, focal]}\nloss.gamma: {uniform: [1, 2], when: {loss.name: focl}}\n", "loss.gamma: when loss.name = 'focl'"),
    ("loss.gamma: {uniform: [1, 2], when: {optim.name: sgd}}\n", "'when' names 'optim.name', which must be a searched key"),
    ("data.shards: {choice: [a, b]}\n", "'data.shards' is set by --shards"),
    ("- optim.lr\n", "expected a mapping of config keys"),
    ("optim.lr: {loguniform: [1.0e-5, 1.0e-2]\n", "line 2"),
]


@pytest.mark.parametrize("text,message", BAD_SPACES)
def test_bad_space_is_refused_in_one_line_before_ray_starts(shards, tmp_path, capsys, text, message):
    import ray

    space = tmp_path / "bad.yaml"
    space.write_text(text)
    code = cli_main(["tune", *tune_args(shards, tmp_path, "bad", space=space)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(space) in err[0] and message in err[0], err[0]
    assert not ray.is_initialized() and not (tmp_path / "bad").exists()


def test_refusals_before_ray_starts(shards, tmp_path, capsys):
    import ray

    assert cli_main(["tune", *tune_args(tmp_path / "nowhere", tmp_path, "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    space = tmp_path / "cat.yaml"
    space.write_text("aug.preset: {choice: [flip, strong]}\n")
    assert cli_main(["tune", *tune_args(shards, tmp_path, "x", "--scheduler", "pbt", space=space)]) == 2
    assert "--scheduler pbt" in capsys.readouterr().err
    assert cli_main(["tune", *tune_args(shards, tmp_path, "x", "--resume")]) == 2
    assert "--resume: no experiment" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_local_paths_become_absolute_for_trials(shards, tmp_path, monkeypatch):
    """Ray runs trials in their own working folders, so a relative --shards must not reach them."""
    from chexdist.tuning.options import TuneOptions
    from chexdist.tuning.tuner import plan_search

    monkeypatch.chdir(shards.parent)
    plan = plan_search(TuneOptions(shards.name, space=str(TINY_SPACE), recipe="tiny", overrides=FIXED,
                                   storage=str(tmp_path), name="rel"))
    assert plan.config.data.shards == str(shards) and plan.config.model.pretrained is None


def test_shards_not_visible_on_a_node_is_one_line_naming_the_path(tmp_path):
    from chexdist.tuning.trial import check_shards_visible

    with pytest.raises(ChexdistError) as err:
        check_shards_visible(str(tmp_path / "elsewhere"))
    assert str(tmp_path / "elsewhere") in str(err.value) and "\n" not in str(err.value)
    check_shards_visible("https://example.org/shards")  # URLs are read remotely, never checked here


def test_fit_restores_process_wide_state(shards, tmp_path):
    """Ray reuses worker processes: one trial's settings must not leak into the next."""
    import random

    import numpy as np

    from chexdist.config import apply_overrides
    from chexdist.training.engine import fit

    base = apply_overrides(load_config("tiny", overrides=[f"data.shards={shards}", *FIXED]),
                           {"train.epochs": 1, "data.max_train_batches": 2})
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads(),
              signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = fit(apply_overrides(base, {"train.deterministic": True, "train.seed": 1}), tmp_path / "a", progress=False)
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    second = fit(apply_overrides(base, {"train.deterministic": False}), tmp_path / "b", progress=False)
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads(),
             signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    assert after == before
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()
    assert first.epochs == second.epochs == 1
