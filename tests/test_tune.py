"""Ray Tune search with a real local Ray on CPU: trials run `engine.fit` on tiny synthetic shards.

Every Ray session of this module lives under a short private RAY_TMPDIR, so the module's finalizer can
check that no Ray process of ours is left running (other users' Ray processes are not counted).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from chexdist.cli.main import main as cli_main
from chexdist.config import config_from_dict, load_config, load_yaml
from chexdist.errors import ChexdistError
from tests.conftest import REPO

TINY_SPACE = REPO / "tune" / "spaces" / "tiny.yaml"
FIXED = ["data.image_size=40", "data.eval_resize=48", "data.max_train_batches=4", "eval.bootstrap=0"]
METRIC_KEYS = {"epoch", "step", "lr", "train_loss", "val_loss", "val_auc_mean", "val_ap_mean", "val_f1_mean", "val_auc",
               "val_ap", "val_f1", "val_samples", "val_skipped", "seconds", "world_size", "precision"}


def ray_processes_under(folder: str) -> list[tuple[int, str]]:
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and folder in " ".join(proc.info["cmdline"] or []):
                left.append((proc.info["pid"], " ".join(proc.info["cmdline"])[:120]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


@pytest.fixture(scope="module")
def ray_tmp():
    """A short private Ray temp dir (Unix socket paths must stay under ~107 characters). Its finalizer,
    after the module's last Ray test whatever the order, checks that nothing started under it is still
    alive: Ray's processes may take a moment to exit after ray.shutdown(), so it polls for up to 30 s."""
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    old = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=folder, RAY_AUTH_MODE="disabled")
    yield folder
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    deadline = time.monotonic() + 30
    while (left := ray_processes_under(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes of this module still alive 30 s after the last test: {left}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from chexdist.data.pack import PackSettings, pack_dataset
    from chexdist.data.synth import make_synthetic_nih

    root = tmp_path_factory.mktemp("tune-data")
    make_synthetic_nih(root / "nih", images=300, size=64, seed=0)
    pack_dataset(root / "nih", root / "shards", PackSettings(split="official", size=48, shard_size=64), workers=1, progress=False)
    return root / "shards"


def tune_args(shards: Path, storage: Path, name: str, *extra: str, space: Path = TINY_SPACE) -> list[str]:
    args = ["--space", str(space), "--recipe", "tiny", "--shards", str(shards), "--storage", str(storage), "--name", name]
    for item in FIXED:
        args += ["--set", item]
    return args + list(extra)


def run_cli(args: list[str]) -> int:
    import ray

    try:
        return cli_main(["tune", *args])
    finally:
        ray.shutdown()


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def trial_results(trial_dir: Path) -> list[dict]:
    """Ray's per-report results of one trial (must be strict JSON)."""
    return [strict_json(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def search(ray_tmp, shards, tmp_path_factory):
    """4 trials x 2 epochs of the tiny space (ASHA, random search, seed 3), run once for several tests.
    One trial at a time, so each trial meets ASHA's first rung after all earlier trials have."""
    storage = tmp_path_factory.mktemp("tune-storage")
    code = run_cli(tune_args(shards, storage, "four", "--trials", "4", "--max-epochs", "2", "--seed", "3",
                             "--max-concurrent", "1"))
    return storage / "four", code


def trial_index(row: dict) -> int:
    """The trial's position in the search's sampling order (`<experiment id>_<index>`)."""
    return int(row["trial"].rsplit("_", 1)[1])


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


def split_samples(shards: Path, split: str) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return sum(entry["samples"] for entry in manifest["splits"][split]["shards"])


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


@pytest.mark.slow
def test_pbt_exploits_from_donor_weights_and_keeps_counting_epochs(ray_tmp, shards, tmp_path):
    """2 trials, 3 epochs, a PBT step every epoch: the worse trial restarts from the donor's weights
    at the exploit epoch (tensor for tensor) with a perturbed lr, and keeps counting epochs."""
    from safetensors.torch import load_file

    from chexdist.training.checkpoint import checkpoint_position, list_checkpoints

    space = tmp_path / "pbt.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\naug.preset: flip\n")
    code = run_cli(tune_args(shards, tmp_path, "pbt", "--trials", "2", "--max-epochs", "3", "--scheduler", "pbt",
                             "--perturb-epochs", "1", "--seed", "1", space=space))
    assert code == 0
    rows = read_csv(tmp_path / "pbt" / "results.csv")
    assert len(rows) == 2 and all(r["epochs"] == "3" for r in rows)
    exploited = [r for r in rows if (Path(r["trial_dir"]) / "run" / "pbt-init.safetensors").is_file()]
    assert exploited, "PBT never exploited a trial"
    # Ray's log of each exploit: [trial tag, donor tag, iterations, donor config, new config]. An exploit
    # after the trial's last epoch (it had nothing left to train) changes no run folder.
    policy = [json.loads(line) for line in (tmp_path / "pbt" / "pbt_global.txt").read_text().splitlines()]
    for row in exploited:
        mine = [(p[-2], p[-1]) for p in policy if int(p[0].split("_", 1)[0]) == trial_index(row)]
        run = Path(row["trial_dir"]) / "run"
        (donor,) = [Path(r["trial_dir"]) for r in rows if r is not row]
        cfg = config_from_dict(load_yaml(run / "config.yaml"))
        at = json.loads((run / "tune_state.json").read_text())["epoch_offset"]  # the exploit epoch
        assert cfg.model.pretrained == str(run / "pbt-init.safetensors") and cfg.train.epochs == 3 - at
        donor_at = [c for c in donor.glob("checkpoint_*") if json.loads((c / "tune_state.json").read_text())["epoch_offset"]
                    + checkpoint_position(list_checkpoints(c)[-1]).epoch == at]
        assert donor_at, f"no checkpoint of the donor {donor.name} at epoch {at}"
        want = load_file(list_checkpoints(donor_at[0])[-1] / "model.safetensors")
        got = load_file(run / "pbt-init.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        history = [json.loads(line) for line in (Path(row["trial_dir"]) / "epochs.jsonl").read_text().splitlines()]
        original = history[0]["lr"]  # epoch 1, before any exploit (the plateau schedule cannot cut lr after 1 epoch)
        assert cfg.optim.lr != pytest.approx(original)
        applied = [(donor, new) for donor, new in mine if new["optim.lr"] == pytest.approx(cfg.optim.lr)]
        assert applied and all(new["optim.lr"] != donor["optim.lr"] for donor, new in applied), mine  # perturbed, not copied
        assert [r["lr"] for r in history if r["epoch"] == at + 1][-1] == pytest.approx(cfg.optim.lr)
    for row in rows:  # the trial's own record: Ray rewrites result.json when PBT pauses and clones trials
        history = [json.loads(line) for line in (Path(row["trial_dir"]) / "epochs.jsonl").read_text().splitlines()]
        assert sorted({r["epoch"] for r in history}) == [1, 2, 3]
        assert all(0 <= r["val_auc_mean"] <= 1 for r in history)


# A pipe: shard source that SIGKILLs the trial's Ray worker once, at the first train read after
# epoch 1's validation (so in epoch 2, after epoch 1's checkpoint was reported): a lost worker.
KILL_ONCE = """import glob, os, signal, sys
import psutil
shards, flags, name = sys.argv[1:]
if name.startswith("val-"):
    open(os.path.join(flags, "validated"), "a").close()
elif name.startswith("train-") and os.path.exists(os.path.join(flags, "validated")) and not os.path.exists(os.path.join(flags, "killed")):
    worker = next(p for p in psutil.Process().parents() if p.name().startswith("ray::"))
    reported = sum(len(open(p).read().splitlines()) for p in glob.glob(os.path.join(flags, "fail", "*", "epochs.jsonl")))
    open(os.path.join(flags, "killed"), "w").write(f"{worker.name()} after {reported} report(s)")
    worker.send_signal(signal.SIGKILL)
    sys.exit(1)
os.execvp("cat", ["cat", os.path.join(shards, name)])
"""


def trial_failures(exp: Path) -> dict[str, int]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.num_failures for t in ExperimentAnalysis(str(exp)).trials}


@pytest.mark.slow
def test_a_trial_whose_worker_dies_resumes_from_its_last_checkpoint(ray_tmp, shards, tmp_path):
    """--max-failures: Ray restarts the failed trial from its epoch-1 checkpoint; epoch 1 is not re-run."""
    script = tmp_path / "kill-once.py"
    script.write_text(KILL_ONCE)
    source = f"pipe:exec {sys.executable} {script} {shards} {tmp_path} {{name}}"
    code = run_cli(tune_args(source, tmp_path, "fail", "--trials", "1", "--max-epochs", "2", "--scheduler", "fifo",
                             "--seed", "0", "--max-failures", "1"))
    killed = (tmp_path / "killed").read_text()
    assert killed.startswith("ray::") and killed.endswith("after 1 report(s)"), killed
    assert code == 0
    (row,) = read_csv(tmp_path / "fail" / "results.csv")
    assert (row["status"], row["epochs"], row["error"]) == ("DONE", "2", "")
    assert trial_failures(tmp_path / "fail") == {row["trial"]: 1}
    reported = [json.loads(line)["epoch"] for line in (Path(row["trial_dir"]) / "epochs.jsonl").read_text().splitlines()]
    assert reported == [1, 2]  # from scratch it would be [1, 1, 2]
    assert [json.loads(line)["epoch"] for line in (Path(row["trial_dir"]) / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_trial_time_stops_trials_and_time_budget_leaves_them_unfinished(ray_tmp, shards, tmp_path, capsys):
    """Budgets that certainly expire: --trial-time 0.001 s ends the trial at its first report (STOPPED
    after 1 of 3 epochs); --time-budget 0.001 s ends the search before any trial reports (UNFINISHED)."""
    code = run_cli(tune_args(shards, tmp_path, "trialtime", "--trials", "1", "--max-epochs", "3", "--scheduler", "fifo",
                             "--seed", "0", "--trial-time", "0.001"))
    assert code == 0
    assert [(r["status"], r["epochs"]) for r in read_csv(tmp_path / "trialtime" / "results.csv")] == [("STOPPED", "1")]
    code = run_cli(tune_args(shards, tmp_path, "budget", "--trials", "2", "--max-epochs", "3", "--scheduler", "fifo",
                             "--seed", "0", "--time-budget", "0.001"))
    assert code == 1  # no trial reported a result, so no best.yaml
    rows = read_csv(tmp_path / "budget" / "results.csv")
    assert rows and [(r["status"], r["epochs"]) for r in rows] == [("UNFINISHED", "0")] * len(rows), rows
    assert f"{len(rows)} trial(s) did not finish" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_killing_the_search_does_not_rerun_finished_trials(ray_tmp, shards, tmp_path):
    args = tune_args(shards, tmp_path, "crash", "--trials", "6", "--max-epochs", "2", "--scheduler", "fifo",
                     "--max-concurrent", "1", "--seed", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    cmd = [sys.executable, str(REPO / "tune" / "search.py"), *args]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    exp = tmp_path / "crash"
    finished: set[str] = set()
    deadline = time.time() + 240
    while not finished and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for state in exp.glob("experiment_state-*.json"):
            try:
                trials = json.loads(state.read_text())["trial_data"]
            except (ValueError, KeyError, OSError):
                continue
            states = [json.loads(trial) for trial, _ in trials]
            finished = {t["trial_id"] for t in states if t["status"] == "TERMINATED"}
    assert proc.poll() is None, f"the search ended before it could be killed: {log.read_text()[-3000:]}"
    assert finished, "no trial finished within 240 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = {p.name: (p / "run" / "metrics.jsonl").read_text() for p in exp.iterdir()
                   if p.is_dir() and p.name.split("_")[2] + "_" + p.name.split("_")[3] in finished}
    assert done_before and all(len(text.splitlines()) == 2 for text in done_before.values())
    mtimes = {name: (exp / name / "run" / "metrics.jsonl").stat().st_mtime_ns for name in done_before}

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_csv(exp / "results.csv")
    assert len(rows) == 6
    assert [(r["trial"], r["status"], r["epochs"], r["error"]) for r in rows if (r["status"], r["epochs"]) != ("DONE", "2")] == []
    for name, text in done_before.items():
        assert (exp / name / "run" / "metrics.jsonl").read_text() == text
        assert (exp / name / "run" / "metrics.jsonl").stat().st_mtime_ns == mtimes[name]
    for row in rows:
        assert [r["epoch"] for r in trial_results(Path(row["trial_dir"]))][-1] == 2


@pytest.mark.slow
def test_ctrl_c_lists_unfinished_trials_and_resume_finishes_them(ray_tmp, shards, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the search's process group) while trials run or wait."""
    args = tune_args(shards, tmp_path, "ctrlc", "--trials", "4", "--max-epochs", "2", "--scheduler", "fifo",
                     "--max-concurrent", "1", "--seed", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tune" / "search.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not list((tmp_path / "ctrlc").glob("*/epochs.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    rows = read_csv(tmp_path / "ctrlc" / "results.csv")
    unfinished = [r for r in rows if r["status"] == "UNFINISHED"]
    assert len(rows) <= 4 and unfinished and all(r["status"] in ("DONE", "UNFINISHED") for r in rows), rows  # later ones not created yet
    assert all(r["loss.name"] in ("bce", "focal") for r in rows)  # a trial that never reported still shows its parameters
    assert f"{len(unfinished)} trial(s) did not finish" in out and "with --resume continues them" in out

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(r["status"], r["epochs"]) for r in read_csv(tmp_path / "ctrlc" / "results.csv")] == [("DONE", "2")] * 4
    assert "did not finish" not in resumed.stdout


@pytest.mark.slow
def test_resume_restores_from_the_newer_checkpoint_when_ray_recorded_a_deleted_one(ray_tmp, shards, tmp_path, caplog):
    """Ray deletes a trial's older checkpoint before its snapshot records the newer one, so a search
    killed in between restores from a deleted checkpoint. Made here on purpose: a finished one-trial
    search whose snapshot says the trial is running, its recorded checkpoint gone, a newer one beside it."""
    args = tune_args(shards, tmp_path, "stale", "--trials", "1", "--max-epochs", "2", "--scheduler", "fifo", "--seed", "3")
    assert run_cli(args) == 0
    exp = tmp_path / "stale"
    trial_dir = next(p for p in exp.iterdir() if p.name.startswith("run_trial_"))
    assert [p.name for p in trial_dir.glob("checkpoint_*")] == ["checkpoint_000001"]
    (trial_dir / "checkpoint_000001").rename(trial_dir / "checkpoint_000002")
    snapshot = max(exp.glob("experiment_state-*.json"))
    state = json.loads(snapshot.read_text())
    assert '"status": "TERMINATED"' in state["trial_data"][0][0]
    state["trial_data"] = [[trial.replace('"status": "TERMINATED"', '"status": "RUNNING"'), meta] for trial, meta in state["trial_data"]]
    snapshot.write_text(json.dumps(state))
    metrics = (trial_dir / "run" / "metrics.jsonl").read_text()

    with caplog.at_level("WARNING", logger="chexdist"):
        assert run_cli([*args, "--resume"]) == 0
    rows = read_csv(exp / "results.csv")
    assert [(r["status"], r["epochs"], r["error"]) for r in rows] == [("DONE", "2", "")]
    assert (trial_dir / "checkpoint_000001" / "tune_state.json").is_file()
    assert (trial_dir / "run" / "metrics.jsonl").read_text() == metrics  # continued at epoch 2: nothing re-run
    assert "its recorded checkpoint checkpoint_000001 was deleted" in caplog.text and "newer checkpoint_000002" in caplog.text


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
