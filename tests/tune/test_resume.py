"""A search killed (SIGKILL) or stopped by Ctrl-C, then --resume; a snapshot naming a deleted checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.tune.kit import tune_args, run_cli, trial_results, read_csv


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
