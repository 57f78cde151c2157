"""A 4-trial ASHA search (random search, seed 3) read back by several tests, and a 2-worker Optuna trial."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from chexdist.config import config_from_dict, load_config, load_yaml
from tests.tune.kit import tune_args, run_cli, trial_results, read_csv, trial_index, split_samples, METRIC_KEYS


@pytest.fixture(scope="module")
def search(ray_tmp, shards, tmp_path_factory):
    """4 trials x 2 epochs of the tiny space (ASHA, random search, seed 3), run once for several tests.
    One trial at a time, so each trial meets ASHA's first rung after all earlier trials have. Each
    trial logs to TensorBoard (`train.log_with`), in its own run folder."""
    storage = tmp_path_factory.mktemp("tune-storage")
    code = run_cli(tune_args(shards, storage, "four", "--trials", "4", "--max-epochs", "2", "--seed", "3",
                             "--max-concurrent", "1", "--set", "train.log_with=tensorboard"))
    return storage / "four", code


@pytest.mark.slow
def test_four_trials_report_auc_f1_and_write_outputs(search, capsys):
    exp, code = search
    assert code == 0
    rows = read_csv(exp / "results.csv")
    assert len(rows) == 4 and all(r["status"] in ("DONE", "STOPPED") for r in rows)
    assert any(r["status"] == "DONE" and r["epochs"] == "2" for r in rows)
    for row in rows:
        results = trial_results(Path(row["trial_dir"]))
        assert [r["epoch"] for r in results] == list(range(1, int(row["epochs"]) + 1))
        for r in results:
            assert 0 <= r["val_auc_mean"] <= 1 and 0 <= r["val_f1_mean"] <= 1 and 0 <= r["val_ap_mean"] <= 1
            assert set(r["val_auc"]) == set(r["val_f1"]) and len(r["val_auc"]) == 14
        assert float(row["best_val_auc_mean"]) == pytest.approx(max(r["val_auc_mean"] for r in results))
        engine_lines = (Path(row["trial_dir"]) / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(engine_lines) == int(row["epochs"])
    aucs = [float(r["best_val_auc_mean"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True)
    assert (exp / "val_auc_per_epoch.png").stat().st_size > 1000 and (exp / "params_vs_auc.png").stat().st_size > 1000


@pytest.mark.slow
def test_every_trial_logs_its_own_tensorboard_run(search):
    """One TensorBoard run per trial, under the trial's run folder, holding that trial's own epochs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp, code = search
    assert code == 0
    rows = read_csv(exp / "results.csv")
    logged = []
    for row in rows:
        acc = EventAccumulator(str(Path(row["trial_dir"]) / "run" / "chexdist"), size_guidance={"scalars": 0})
        acc.Reload()
        aucs = [e.value for e in acc.Scalars("val/auc_mean")]
        assert aucs == pytest.approx([r["val_auc_mean"] for r in trial_results(Path(row["trial_dir"]))], abs=1e-6)
        logged.append(tuple(aucs))
    assert len(set(logged)) == len(rows), "two trials logged the same curve: one shared run?"


@pytest.mark.slow
def test_asha_stops_the_worse_trials_at_its_first_rung(search):
    """ASHA (grace 1 epoch, reduction factor 2, 2 epochs): at epoch 1 a trial stops when its val AUC is
    below the median of the epoch-1 AUCs recorded before it (np.percentile, Ray's cutoff). The trials
    ran one at a time in sampling order, so each one's cutoff is recomputed here from its results."""
    exp, code = search
    assert code == 0
    rows = sorted(read_csv(exp / "results.csv"), key=trial_index)
    rung = [trial_results(Path(r["trial_dir"]))[0] for r in rows]
    assert all(r["epoch"] == 1 for r in rung)
    expected = []
    for i, first in enumerate(rung):
        earlier = [r["val_auc_mean"] for r in rung[:i]]
        worse = bool(earlier) and first["val_auc_mean"] < np.percentile(earlier, 50)
        expected.append(("STOPPED", "1") if worse else ("DONE", "2"))
    assert [(r["status"], r["epochs"]) for r in rows] == expected, [r["val_auc_mean"] for r in rung]
    assert ("STOPPED", "1") in expected, f"no trial was worse than the median at the first rung: {[r['val_auc_mean'] for r in rung]}"


@pytest.mark.slow
def test_trials_really_train_different_configs_with_conditional_keys(search):
    exp, code = search
    assert code == 0
    rows = read_csv(exp / "results.csv")
    configs = {r["trial"]: config_from_dict(load_yaml(Path(r["trial_dir"]) / "run" / "config.yaml")) for r in rows}
    for key in ("loss.name", "optim.name", "aug.preset"):
        section, name = key.split(".")
        saved = [getattr(getattr(c, section), name) for c in configs.values()]
        assert len(set(saved)) > 1, f"every trial trained {key}={saved[0]}"
        assert saved == [r[key] for r in rows]
    recipe = load_config("tiny")
    for row in rows:
        cfg = configs[row["trial"]]
        assert cfg.optim.lr == pytest.approx(float(row["optim.lr"]))
        if cfg.loss.name == "focal":
            assert cfg.loss.gamma == pytest.approx(float(row["loss.gamma"]))
        else:
            assert row["loss.gamma"] == "" and cfg.loss.gamma == recipe.loss.gamma  # inactive: not applied
        if cfg.optim.name != "sgd":
            assert row["optim.momentum"] == "" and cfg.optim.momentum == recipe.optim.momentum


@pytest.mark.slow
def test_best_recipe_loads_and_trains(search, tmp_path):
    from chexdist.config import apply_overrides
    from chexdist.training.engine import fit

    exp, code = search
    assert code == 0
    best_row = read_csv(exp / "results.csv")[0]
    best = load_config(str(exp / "best.yaml"))
    trial = config_from_dict(load_yaml(Path(best_row["trial_dir"]) / "run" / "config.yaml"))
    trial.train.keep_checkpoints = best.train.keep_checkpoints
    trial.recipe = best.recipe = ""
    assert best == trial
    assert best.data.shards == str(Path(best.data.shards).resolve()) and Path(best.data.shards, "manifest.json").is_file()
    result = fit(apply_overrides(best, {"train.epochs": 1, "data.max_train_batches": 2}), tmp_path / "best-run", progress=False)
    assert result.epochs == 1 and (tmp_path / "best-run" / "best.json").is_file()


@pytest.mark.slow
def test_two_worker_trial_splits_the_data_and_saves_the_optuna_state(search, shards, tmp_path):
    """A TorchTrainer DDP trial (sampled by Optuna's TPE) reports what a 1-process trial does; its two
    workers split the data (every val image scored once, steps from the global batch of both ranks),
    and Optuna's study is saved with the experiment (what --resume restores the searcher from)."""
    exp, _ = search
    code = run_cli(tune_args(shards, tmp_path, "ddp", "--trials", "1", "--max-epochs", "1", "--scheduler", "fifo",
                             "--workers-per-trial", "2", "--search", "optuna", "--seed", "0",
                             "--set", "data.max_train_batches=0"))
    assert code == 0
    (row,) = read_csv(tmp_path / "ddp" / "results.csv")
    (result,) = trial_results(Path(row["trial_dir"]))
    single = trial_results(Path(read_csv(exp / "results.csv")[0]["trial_dir"]))[0]
    assert METRIC_KEYS <= set(result) and METRIC_KEYS <= set(single)
    ours = lambda r: {k for k in r if k in METRIC_KEYS or k.startswith("val_")}  # noqa: E731
    assert ours(result) == ours(single)
    assert result["world_size"] == 2 and single["world_size"] == 1
    assert 0 <= result["val_auc_mean"] <= 1 and 0 <= result["val_f1_mean"] <= 1
    batch = load_config("tiny").data.batch_size
    assert result["val_samples"] == split_samples(shards, "val") and result["val_skipped"] == 0
    assert result["global_batch"] == 2 * batch == 2 * result["batch_size"]
    assert result["step"] == math.ceil(split_samples(shards, "train") / (2 * batch))
    (saved,) = (tmp_path / "ddp").glob("searcher-state-*.pkl")
    with open(saved, "rb") as f:
        study = pickle.load(f)["_ot_study"]
    (told,) = study.trials
    assert told.state.name == "COMPLETE" and told.value == pytest.approx(result["val_auc_mean"])
    sampled = json.loads((Path(row["trial_dir"]) / "params.json").read_text())
    assert told.params and all(sampled[k] == pytest.approx(v) if isinstance(v, float) else sampled[k] == v
                               for k, v in told.params.items())
