"""Stop signals on a real training process, each delivered at a point fixed by construction: a second
Ctrl-C aborts without saving, a kill inside a checkpoint save leaves only a temp folder that
`--resume` passes over, and a SIGTERM that arrives during start-up is held and then honoured."""

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

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
SETS = ("train.epochs=3", "data.max_train_batches=2")

# fit() as train.py runs it, with a seam that parks the process at a known point and says so in a flag
# file: `report` (after epoch 1's checkpoint) or Accelerate's save_state (epoch 2's, before the
# trainer state that completes it is written). A parked process waits at most 120 s, then goes on.
PARKED_FIT = """
import sys, threading
from pathlib import Path
import accelerate
from chexdist.config import load_config
from chexdist.training.engine import fit

flag, where, out, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
saves, save_state = [0], accelerate.Accelerator.save_state

def park():
    flag.write_text("parked")
    threading.Event().wait(120)

def report(record):
    if where == "report" and record["epoch"] == 1:
        park()

def parked_save_state(self, *args, **kwargs):
    saves[0] += 1
    done = save_state(self, *args, **kwargs)
    if where == "save" and saves[0] == 2:
        park()
    return done

accelerate.Accelerator.save_state = parked_save_state
fit(load_config("tiny", overrides=overrides), out, report=report, progress=False)
"""


def train_cmd(shards: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "chexdist.train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--no-progress"]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def start_parked(tmp_path: Path, shards: Path, out: Path, where: str) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / f"parked-{where}"
    proc = subprocess.Popen([sys.executable, "-c", PARKED_FIT, str(flag), where, str(out), f"data.shards={shards}", *SETS],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: flag.exists() or proc.poll() is not None, 300)
    assert flag.exists(), proc.communicate()[1][-3000:]
    return proc, flag


def wait_for(condition, bound_s: float) -> None:
    deadline = time.time() + bound_s
    while not condition() and time.time() < deadline:
        time.sleep(0.01)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_saving(train_shards, tmp_path):
    out = tmp_path / "run"
    proc, _ = start_parked(tmp_path, train_shards, out, "report")
    saved = checkpoints(out)
    assert saved == ["step000000002-epoch0001-batch000000"]
    proc.send_signal(signal.SIGINT)
    stderr_lines = []
    # the first Ctrl-C is announced (and arms the second) before the parked process goes on
    while not any("received SIGINT" in line for line in stderr_lines):
        line = proc.stderr.readline()
        assert line, "the process ended without announcing the first Ctrl-C"
        stderr_lines.append(line)
    assert "Ctrl-C again aborts without saving" in stderr_lines[-1]
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the second Ctrl-C did not end the process")
    assert proc.returncode == -signal.SIGINT, "the second Ctrl-C must end the process at once"
    assert checkpoints(out) == saved
    assert not (out / "PREEMPTED").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_a_temp_folder_that_resume_passes_over(train_shards, tmp_path):
    out = tmp_path / "run"
    proc, _ = start_parked(tmp_path, train_shards, out, "save")
    proc.kill()
    proc.communicate()
    assert checkpoints(out) == [".tmp-step000000004-epoch0002-batch000000", "step000000002-epoch0001-batch000000"]

    resumed = subprocess.run([*train_cmd(train_shards, out), "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step000000002-epoch0001-batch000000'} (epoch 1, step 2, batch 0)" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not any(name.startswith(".tmp") for name in checkpoints(out))


@pytest.mark.slow
def test_a_sigterm_during_start_up_is_held_then_honoured(train_shards, tmp_path):
    """The signal is sent at once to a process started with it blocked (as `launcher.run_workers` starts
    its workers), so it is pending from the first instruction: it must neither kill the process nor
    be lost, but stop the run at its first safe point with a checkpoint and exit 75."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(train_shards, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    assert "received SIGTERM" in stderr and "rerun with --resume" in stderr
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and marker["epoch"] == 0 and marker["step"] <= 2
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
