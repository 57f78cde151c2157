"""Processes, signals and exit codes of `chexdist train --nproc 2` and `accelerate launch`, with real
worker processes (CPU, gloo): refusals in the parent, Ctrl-C, SIGUSR1/SIGTERM preemption with the
PREEMPTED marker, a signal during validation, `--resume auto`, and exact resume after all of it."""

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
DETERMINISTIC = ("train.epochs=3", "train.deterministic=true", "train.checkpoint_every=5")
EPOCH_STEPS = 21  # 672 train images / 2 ranks / batch 16; checkpoints every 5 steps keep signals mid-epoch


def train_cmd(shards: Path | str, out: Path, *extra: str, sets: tuple[str, ...] = DETERMINISTIC) -> list[str]:
    cmd = [sys.executable, "-m", "chexdist.cli", "train", "--nproc", "2", "--recipe", "tiny", "--shards", str(shards),
           "--out", str(out), "--no-progress", *extra]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or ENV, timeout=timeout)


def signal_when(cmd: list[str], ready: Path, signals: tuple[int, ...], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `cmd`; once `ready` exists, send `signals` to it (the launcher's pid, as SLURM or a terminal would)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for sig in signals:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def marker(out: Path) -> dict:
    return json.loads((out / "PREEMPTED").read_text())


def checkpoint(out: Path, step: int, epoch: int, batch: int = 0) -> Path:
    return out / "checkpoints" / f"step{step:09d}-epoch{epoch:04d}-batch{batch:06d}"


def assert_same_run(reference: Path, out: Path) -> None:
    a, b = metrics(reference), metrics(out)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("step", "val_loss", "val_auc", "val_f1", "val_thresholds", "lr"):
            assert ra[key] == rb[key], key
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream and "ChildFailedError" not in stream, stream[-3000:]


@pytest.fixture(scope="module")
def reference(train_shards, tmp_path_factory) -> Path:
    """An unbroken 2-process run, started with `--resume auto` on an empty folder (a fresh start)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(train_cmd(train_shards, out, "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" not in done.stdout and not (out / "PREEMPTED").exists()
    assert "on 2 processes (MULTI_CPU" in done.stdout
    assert "defaults used instead" not in done.stderr and "Traceback" not in done.stderr
    assert len(metrics(out)) == 3
    return out


@pytest.mark.slow
def test_nproc_refuses_in_the_parent_with_one_line(train_shards, reference, tmp_path):
    missing = run(train_cmd(tmp_path / "no-shards", tmp_path / "a"), timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [(f"chexdist: error: {tmp_path / 'no-shards' / 'manifest.json'}: no manifest; pack the "
                                            "data first (chexdist pack) or point data.shards at a packed dataset")]
    assert missing.stdout == "" and not (tmp_path / "a").exists()

    taken = run(train_cmd(train_shards, reference), timeout=300)
    assert taken.returncode == 2
    assert taken.stderr.splitlines() == [(f"chexdist: error: {reference}: already has checkpoints; pass --resume to continue "
                                          "it or choose a new --out")]
    assert taken.stdout == ""


@pytest.mark.slow
def test_sigint_saves_exits_130_without_traceback_and_resumes(train_shards, reference, tmp_path):
    out = tmp_path / "ctrl-c"
    stopped = signal_when(train_cmd(train_shards, out), checkpoint(out, 5, 0, 5), (signal.SIGINT,))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    no_traceback(stopped)
    info = marker(out)
    assert info["signal"] == "SIGINT" and Path(info["checkpoint"]).is_dir()
    assert Path(info["checkpoint"]).name == f"step{info['step']:09d}-epoch0000-batch{info['batch']:06d}" and info["batch"] > 0
    assert stopped.stderr.count("rerun with --resume") == 1
    assert f"SIGINT: saved checkpoint {info['checkpoint']}" in stopped.stderr

    resumed = run(train_cmd(train_shards, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / Path(info['checkpoint']).name}" in resumed.stdout
    assert not (out / "PREEMPTED").exists()
    assert_same_run(reference, out)


@pytest.mark.slow
def test_preemption_in_validation_and_in_training_requeues_and_resumes_exactly(train_shards, reference, tmp_path):
    """SIGUSR1 while validation reads its shard (a pipe: source that holds the first val read for 4 s
    and leaves a flag, so the signal lands there), then SIGTERM in training, each followed by the
    `--resume auto` a requeued job runs; the end result equals the unbroken run."""
    out, flag = tmp_path / "preempted", tmp_path / "validating"
    script = tmp_path / "slow-val.sh"
    script.write_text('case "$3" in val-*) [ -e "$2" ] || { : > "$2"; sleep 4; } ;; esac\nexec cat "$1/$3"\n')
    source = f"pipe:sh {script} {train_shards} {flag} {{name}}"

    in_validation = signal_when(train_cmd(source, out, "--resume", "auto"), flag, (signal.SIGUSR1,))
    assert in_validation.returncode == 75, in_validation.stderr[-3000:]
    no_traceback(in_validation)
    info = marker(out)
    assert info["signal"] == "SIGUSR1" and (info["epoch"], info["step"], info["batch"]) == (1, EPOCH_STEPS, 0)
    assert info["checkpoint"] == str(checkpoint(out, EPOCH_STEPS, 1).resolve())  # right after validation, not in epoch 2
    assert [r["epoch"] for r in metrics(out)] == [1]

    in_training = signal_when(train_cmd(train_shards, out, "--resume", "auto"), checkpoint(out, 25, 1, 4), (signal.SIGTERM,))
    assert in_training.returncode == 75, in_training.stderr[-3000:]
    no_traceback(in_training)
    assert f"resumed from {checkpoint(out, EPOCH_STEPS, 1)}" in in_training.stdout
    info = marker(out)
    assert info["signal"] == "SIGTERM" and info["epoch"] == 1 and 0 < info["batch"] < EPOCH_STEPS
    assert info["step"] == EPOCH_STEPS + info["batch"]

    finished = run(train_cmd(train_shards, out, "--resume", "auto"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / Path(info['checkpoint']).name}" in finished.stdout
    assert not (out / "PREEMPTED").exists()
    assert_same_run(reference, out)


@pytest.mark.slow
def test_accelerate_launch_errors_come_from_rank_0_only(train_shards, tmp_path):
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    base = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(REPO / "chexdist" / "train.py"),
            "--recipe", "tiny", "--out", str(tmp_path / "run")]
    bad_key = run([*base, "--shards", str(train_shards), "--set", "loss.name=hinge"], env=env, timeout=300)
    assert bad_key.returncode != 0
    errors = [line for line in bad_key.stderr.splitlines() if line.startswith("chexdist:")]
    assert len(errors) == 1 and errors[0].startswith("chexdist: error: config key 'loss.name': 'hinge'"), bad_key.stderr[-3000:]
    assert "defaults used instead" not in bad_key.stderr  # the README's flags leave nothing to defaults

    no_shards = run([*base, "--shards", str(tmp_path / "none")], env=env, timeout=300)  # found by rank 0's preflight in fit
    assert no_shards.returncode != 0
    errors = [line for line in no_shards.stderr.splitlines() if line.startswith("chexdist:")]
    assert len(errors) == 1 and errors[0].startswith("chexdist: error: ") and "no manifest" in errors[0], no_shards.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launcher_env_and_first_failing_exit_code(monkeypatch, tmp_path, capsys):
    """The worker environment Accelerate reads, and exit codes: a rank's 2 passes through and a rank
    still running GRACE_S later is killed and named in one line."""
    from chexdist.training import launcher

    monkeypatch.setattr(launcher, "GRACE_S", 1.0)
    script = (f"import json, os, sys, time\n"
              f"keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU')\n"
              f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w').write(json.dumps({{k: os.environ.get(k) for k in keys}}))\n"
              f"sys.exit(2) if os.environ['RANK'] == '1' else time.sleep(120)\n")
    assert launcher.run_workers([sys.executable, "-c", script], 2, cpu=True) == 2
    envs = [json.loads((tmp_path / str(rank)).read_text()) for rank in range(2)]
    for rank, env in enumerate(envs):
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": envs[0]["MASTER_PORT"], "ACCELERATE_USE_CPU": "1"}
    assert capsys.readouterr().err.splitlines() == ["chexdist: rank 1 exited with exit code 2; killed rank(s) 0 still running 1 s later"]

    killed = "import os, signal, time\nos.kill(os.getpid(), signal.SIGKILL) if os.environ['RANK'] == '0' else time.sleep(0.5)\n"
    assert launcher.run_workers([sys.executable, "-c", killed], 2, cpu=True) == 128 + signal.SIGKILL
    assert capsys.readouterr().err.splitlines() == ["chexdist: rank 0 was killed by SIGKILL"]



def test_a_command_destroys_its_process_group_before_exit(monkeypatch):
    """Left to interpreter exit, a gloo thread still freeing a finished all-gather's tensors can abort
    the process (SIGABRT, "terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    from chexdist.cli import evaluation, main as cli
    from chexdist.training.launcher import free_port

    def evaluate_in_a_group(args) -> int:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        gathered = [None]
        dist.all_gather_object(gathered, "scored")
        return 0 if gathered == ["scored"] else 1

    monkeypatch.setattr(evaluation, "cmd_evaluate", evaluate_in_a_group)
    assert cli.main(["evaluate", "--run", "unused"]) == 0
    assert not dist.is_initialized()
