"""A trial whose worker dies (--max-failures) and the time budgets (--trial-time, --time-budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.tune.kit import tune_args, run_cli, read_csv, trial_failures


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
