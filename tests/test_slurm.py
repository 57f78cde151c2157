"""The sbatch scripts on a real one-node SLURM cluster (slurmctld + slurmd + munged, started by
slurm/local-cluster.sh, installed from Debian when missing): CPU training with 2 processes, preemption
that requeues and resumes, the pack array job, two srun tasks acting as two machines, bad input.
If SLURM cannot start, every test here fails with the reason (never skipped)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = REPO / "slurm"
SCRIPTS = sorted(str(p) for p in SLURM.iterdir() if p.suffix in (".sh", ".sbatch"))
# Small enough for 2 cores, long enough (4 epochs of 11 steps per rank) to be signalled mid-run.
SETS = "train.epochs=4 data.batch_size=8"
# A tune trial small enough that 2 of them plus Ray's start fit in about a minute on 2 cores.
TUNE_SETS = ("data.batch_size=8", "data.image_size=40", "data.eval_resize=48", "data.max_train_batches=4", "eval.bootstrap=0")


def sh(*cmd: str, env: dict | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}: {result.stdout[-1500:]}{result.stderr[-1500:]}")
    return result


class Cluster:
    """The client side of the local cluster: submit with the right environment, wait, inspect."""

    def __init__(self, env: dict[str, str], state: Path):
        self.env, self.state = env, state

    def sbatch(self, *args: str, settings: dict[str, str], workdir: Path, script: str = "train.sbatch") -> str:
        """Submit `script` with `settings` as environment variables (what --export=ALL passes on)."""
        out = sh("sbatch", "--parsable", f"--chdir={workdir}", *args, str(SLURM / script),
                 env={**self.env, **settings})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = sh("scontrol", "show", "job", "-o", job_id, env=self.env).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait(self, job_id: str, log: Path | None = None, timeout: float = 240) -> dict[str, str]:
        """Wait until the job has ended (COMPLETED, FAILED, ...; not requeued or pending)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(0.5)
        sh("scancel", job_id, env=self.env, check=False)
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        pytest.fail(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s; log tail:\n{tail}")

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """What SLURM does before the time limit with --signal=B:USR1@120."""
        sh("scancel", f"--signal={sig}", "--batch", job_id, env=self.env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "CHEXDIST_SLURM_STATE": str(state)}
    started = subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "start"], capture_output=True, text=True,
                             env=env, timeout=600)
    if started.returncode:
        pytest.fail(f"the local SLURM cluster did not start (slurm/local-cluster.sh start exited {started.returncode}): "
                    f"{started.stdout[-2000:]}{started.stderr[-2000:]}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    # What the jobs inherit (sbatch --export=ALL): this python, this checkout, one thread per process.
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CHEXDIST_HOME=str(REPO))
    yield Cluster(env, state)
    subprocess.run(["bash", str(SLURM / "local-cluster.sh"), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def shards(synth_shards) -> Path:
    return synth_shards


def train_job(cluster: Cluster, workdir: Path, out: Path, *sbatch_args: str, **export: str) -> tuple[str, Path]:
    log = workdir / f"{out.name}.out"
    settings = {"RECIPE": "tiny", "OUT": str(out), "SETS": SETS, **export}
    job_id = cluster.sbatch(f"--output={log}", *sbatch_args, settings=settings, workdir=workdir)
    return job_id, log


def epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; log tail:\n{log.read_text()[-3000:] if log.exists() else '(no log)'}")


@pytest.fixture(scope="module")
def unbroken(cluster, shards, tmp_path_factory) -> Path:
    """train.sbatch on CPU, 1 node x 2 processes, run to the end: the reference for the others."""
    workdir = tmp_path_factory.mktemp("train")
    out = workdir / "run"
    job_id, log = train_job(cluster, workdir, out, "--cpus-per-task=2", SHARDS=str(shards), PROCS_PER_NODE="2")
    info = cluster.wait(job_id, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-3000:]
    return out


def test_train_sbatch_two_cpu_processes_completes(unbroken):
    log = unbroken.parent / "run.out"
    text = log.read_text()
    assert "1 machine(s) x 2 process(es), CPU" in text
    assert "on 2 processes (MULTI_CPU" in text
    assert (unbroken / "best.safetensors").stat().st_size > 0
    best = json.loads((unbroken / "best.json").read_text())
    records = epochs(unbroken)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in records)
    assert best["val_metrics"]["val_auc_mean"] == max(r["val_auc_mean"] for r in records)
    assert not (unbroken / "PREEMPTED").exists()


def test_preempted_in_validation_then_in_training_requeues_resumes_and_finishes_like_an_unbroken_run(
        cluster, shards, unbroken, tmp_path):
    """USR1 while epoch 1's validation reads its shard, then USR1 in the restarted job's training. A
    pipe: source holds the first val read for 6 s (flag `validating`), and, once the test arms it
    after the restart, the first train read (flag `training`), so each signal lands where intended.
    SLURM delivers a step's signal to every process of the step, the shard reader and the DataLoader
    workers included: they must not act on it (chexdist.utils.stopsignals), so no sample is skipped."""
    out = tmp_path / "run"
    script = tmp_path / "slow-read.sh"
    script.write_text(
        'case "$3" in\n'
        '  val-*) [ -e "$2/validating" ] || { : > "$2/validating"; sleep 6; } ;;\n'
        '  train-*) [ -e "$2/armed" ] && [ ! -e "$2/training" ] && { : > "$2/training"; sleep 6; } ;;\n'
        "esac\n"
        'exec cat "$1/$3"\n')
    source = f"pipe:exec sh {script} {shards} {tmp_path} {{name}}"
    job_id, log = train_job(cluster, tmp_path, out, "--cpus-per-task=2", SHARDS=source, PROCS_PER_NODE="2")

    def log_text() -> str:
        return log.read_text() if log.exists() else ""

    wait_for((tmp_path / "validating").exists, "epoch 1's validation", log)
    cluster.signal_batch(job_id)  # while validation waits for its shard
    wait_for(lambda: "resumed from" in log_text(), "the restarted job", log)
    (tmp_path / "armed").touch()
    wait_for((tmp_path / "training").exists, "a train shard read in the restarted job", log)
    cluster.signal_batch(job_id)  # while training waits for its shard
    info = cluster.wait(job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "2", text[-3000:]
    assert "restart 0 on" in text and "restart 1 on" in text and "restart 2 on" in text
    # Each restart loaded the checkpoint that the preempted attempt reported in OUT/PREEMPTED.
    saved = [json.loads(m)["checkpoint"] for m in re.findall(r"checkpoint saved \((\{.*?\})\); requeueing", text)]
    resumed = re.findall(r"resumed from (\S+) \(", text)
    assert len(saved) == 2 and resumed == saved, text[-3000:]
    # The signal in validation: the end-of-epoch-1 checkpoint, saved right after validation (not 10
    # steps into epoch 2), with epoch 1's metrics already written by the first attempt.
    steps = epochs(unbroken)[0]["step"]
    assert Path(saved[0]).name == f"step{steps:09d}-epoch0001-batch000000", saved
    # The signal in training: a mid-epoch checkpoint of a later epoch.
    found = re.fullmatch(r"step(\d+)-epoch(\d+)-batch(\d+)", Path(saved[1]).name)
    assert found and int(found[2]) >= 1 and int(found[3]) > 0, saved
    assert "skipped" not in text, text[-3000:]  # every shard read in full, the held ones included
    assert not (out / "PREEMPTED").exists()
    # Not from scratch: every epoch exactly once, with the unbroken run's numbers.
    got, want = epochs(out), epochs(unbroken)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert (a["step"], a["val_auc_mean"], a["val_loss"], a["train_loss"]) == (b["step"], b["val_auc_mean"], b["val_loss"], b["train_loss"])
    got_weights, want_weights = load_file(out / "best.safetensors"), load_file(unbroken / "best.safetensors")
    assert got_weights.keys() == want_weights.keys()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)


# A pipe: shard source that, once a val shard was read (epoch 1 validated), holds every train read
# (epoch 2) until the test creates FLAGS/release: the first job is cancelled at a known point.
HOLD_EPOCH_2 = (
    'case "$3" in\n'
    '  val-*) : > "$2/validated" ;;\n'
    '  train-*) i=0; while [ -e "$2/validated" ] && [ ! -e "$2/release" ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i+1)); done ;;\n'
    "esac\n"
    'exec cat "$1/$3"\n')


def ray_processes(ray_temp: Path) -> list[dict]:
    return [p.info for p in psutil.process_iter(["pid", "cmdline"]) if any(str(ray_temp) in part for part in (p.info["cmdline"] or []))]


def no_ray_left(ray_temp: Path, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while (left := ray_processes(ray_temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_tune_sbatch_resubmitted_continues_the_search_and_stops_ray(cluster, shards, tmp_path):
    """tune.sbatch on the local cluster: Ray head in an srun step, 2 trials x 2 epochs of the tiny space
    one at a time. The first job is cancelled while trial 1 is in epoch 2 (its epoch 1 reported); the
    same job resubmitted continues the experiment (--resume): trial 1 goes on from its epoch-1
    checkpoint, trial 2 runs, and no Ray process of either job is left (found by its temp folder)."""
    ray_temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    storage = tmp_path / "tune"
    script = tmp_path / "hold.sh"
    script.write_text(HOLD_EPOCH_2)
    try:
        settings = {"SPACE": "tiny", "RECIPE": "tiny", "SHARDS": f"pipe:exec sh {script} {shards} {tmp_path} {{name}}",
                    "TRIALS": "2", "MAX_EPOCHS": "2", "STORAGE": str(storage), "NAME": "search", "RAY_TEMP": str(ray_temp / "t"),
                    "RAY_TMPDIR": str(ray_temp), "RAY_AUTH_MODE": "disabled", "CPUS_PER_TRIAL": "1", "TUNE_GLOBAL_CHECKPOINT_S": "0",
                    "TUNE_ARGS": "--scheduler fifo --seed 0 --max-concurrent 1 " + " ".join(f"--set {s}" for s in TUNE_SETS)}
        first_log, log = tmp_path / "first.out", tmp_path / "tune.out"
        first = cluster.sbatch(f"--output={first_log}", "--cpus-per-task=2", settings=settings, workdir=tmp_path,
                               script="tune.sbatch")
        reported = lambda: [p for p in storage.glob("search/*/epochs.jsonl") if p.read_text().strip()]  # noqa: E731
        wait_for(lambda: reported() and (tmp_path / "validated").exists(), "trial 1's epoch 1", first_log, timeout=300)
        sh("scancel", first, env=cluster.env)
        info = cluster.wait(first, first_log)
        assert info["JobState"] == "CANCELLED", first_log.read_text()[-3000:]
        assert no_ray_left(ray_temp) == []
        (trial_one,) = [p.parent for p in reported()]
        assert [json.loads(line)["epoch"] for line in (trial_one / "epochs.jsonl").read_text().splitlines()] == [1]

        (tmp_path / "release").touch()
        job_id = cluster.sbatch(f"--output={log}", "--cpus-per-task=2", settings=settings, workdir=tmp_path,
                                script="tune.sbatch")
        info = cluster.wait(job_id, log, timeout=300)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        assert "Ray head" in text and f"continuing the experiment in {storage}/search" in text
        assert "search exited with code 0; stopping Ray" in text
        with open(storage / "search" / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted((r["status"], r["epochs"]) for r in rows) == [("DONE", "2")] * 2, rows
        assert all(0.0 <= float(r["best_val_auc_mean"]) <= 1.0 for r in rows), rows
        for epochs_file in (trial_one / "epochs.jsonl", trial_one / "run" / "metrics.jsonl"):  # epoch 1 not re-run
            assert [json.loads(line)["epoch"] for line in epochs_file.read_text().splitlines()] == [1, 2], epochs_file
        assert (storage / "search" / "best.yaml").stat().st_size > 0
        assert not (ray_temp / "t").exists()  # the script removed its Ray temp folder
        assert no_ray_left(ray_temp) == []
    finally:
        (tmp_path / "release").touch()
        for p in psutil.process_iter(["cmdline"]):  # only this test's Ray, if an assertion failed above
            if any(str(ray_temp) in part for part in (p.info["cmdline"] or [])):
                p.kill()
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_two_srun_tasks_as_two_machines_train_one_run(cluster, shards, unbroken, tmp_path):
    """The multi-node path on one node: 2 srun tasks, each an accelerate machine with 1 process
    (machine rank = its task ID), rendezvous over the first host, train one run together."""
    out = tmp_path / "run"
    job_id, log = train_job(cluster, tmp_path, out, "--ntasks-per-node=2", "--cpus-per-task=1",
                            SHARDS=str(shards), MACHINES="2", PROCS_PER_NODE="1",
                            SETS="train.epochs=1 data.batch_size=8")
    info = cluster.wait(job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "2 machine(s) x 1 process(es), CPU" in text
    got = epochs(out)
    assert [r["world_size"] for r in got] == [2]
    # Two machines of one process train exactly like one machine of two (the plateau schedule does
    # not depend on the epoch count, so the unbroken run's first epoch is the reference).
    for a, b in zip(got, epochs(unbroken)[:1]):
        assert (a["step"], a["val_auc_mean"], a["train_loss"]) == (b["step"], b["val_auc_mean"], b["train_loss"])
    assert (out / "best.safetensors").is_file()
    assert len(list((out / "checkpoints").iterdir())) >= 1


def test_pack_array_job_equals_a_single_process_pack(cluster, synth_root, synth_shards, tmp_path):
    out = tmp_path / "shards"
    settings = json.loads((synth_shards / "manifest.json").read_text())
    pack_args = (f"--split official --size {settings['image']['size']} --shard-size {settings['shard_size']} "
                 f"--format {settings['image']['format']}")
    env = {**cluster.env, "NIH_ROOT": str(synth_root), "SHARDS": str(out), "PACK_TASKS": "3", "PACK_ARGS": pack_args}
    submitted = sh("bash", str(SLURM / "pack.sbatch"), "--cpus-per-task=1", f"--chdir={tmp_path}", env=env).stdout
    found = re.search(r"array job (\d+) \(3 tasks\) and merge job (\d+)", submitted)
    assert found, submitted
    array_id, merge_id = found.groups()
    info = cluster.wait(merge_id)
    assert info["JobState"] == "COMPLETED", [p.read_text() for p in tmp_path.glob("*.out")]
    tasks = sorted((out / ".pack").glob("task-*.json"))
    assert [p.name for p in tasks] == [f"task-0000{i}-of-00003.json" for i in range(3)]
    names = [n for p in tasks for n in json.loads(p.read_text())["shards"]]
    assert len(names) == len(set(names)) == len(list(synth_shards.glob("*.tar")))
    assert (out / "manifest.json").read_bytes() == (synth_shards / "manifest.json").read_bytes()
    assert (out / "errors.jsonl").read_bytes() == (synth_shards / "errors.jsonl").read_bytes()
    for shard in synth_shards.glob("*.tar"):
        assert hashlib.sha256((out / shard.name).read_bytes()).hexdigest() == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_bad_input_fails_fast_with_one_line_and_is_not_requeued(cluster, shards, tmp_path):
    missing = tmp_path / "no-shards"
    job_id, log = train_job(cluster, tmp_path, tmp_path / "a", "--cpus-per-task=1", SHARDS=str(missing))
    no_gpu_id, no_gpu_log = train_job(cluster, tmp_path, tmp_path / "b", "--cpus-per-task=1", SHARDS=str(shards),
                                      GPUS_PER_NODE="64")
    # A run that fails for another reason (here an unknown config key) is not requeued, even with
    # a PREEMPTED marker left from an earlier attempt in its folder.
    stale = tmp_path / "c"
    stale.mkdir()
    (stale / "PREEMPTED").write_text('{"signal": "SIGUSR1"}\n')
    bad_key_id, bad_key_log = train_job(cluster, tmp_path, stale, "--cpus-per-task=1", SHARDS=str(shards),
                                        SETS="train.no_such_key=1")
    info = cluster.wait(job_id, log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert errors == [f"train.sbatch: error: SHARDS={missing} has no manifest.json (in {REPO}); pack it first or set SHARDS"]
    info = cluster.wait(no_gpu_id, no_gpu_log)
    assert info["JobState"] == "FAILED"
    errors = [line for line in no_gpu_log.read_text().splitlines() if "train.sbatch: error" in line]
    assert len(errors) == 1 and "visible GPU(s), GPUS_PER_NODE=64 wants 64; request them" in errors[0], errors
    info = cluster.wait(bad_key_id, bad_key_log)
    text = bad_key_log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-2000:]
    assert "train.no_such_key" in text and "not requeueing" in text


def test_check_helper_runs_without_slurm(shards, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "CHEXDIST_HOME": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    ok = subprocess.run(["bash", str(SLURM / "train.sbatch"), "--check"], capture_output=True, text=True,
                        env={**env, "SHARDS": str(shards), "RECIPE": "tiny"})
    assert ok.returncode == 0 and ok.stdout.startswith("train.sbatch: ok: recipe tiny"), ok.stderr
    bad = subprocess.run(["bash", str(SLURM / "train.sbatch"), "--check"], capture_output=True, text=True,
                         env={**env, "SHARDS": str(tmp_path / "none")})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no manifest.json" in bad.stderr


def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck", timeout=300, check=False)
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed and apt-get could not install it (apt-get install shellcheck)")
    assert len(SCRIPTS) >= 4, SCRIPTS
    result = sh("shellcheck", "-S", "warning", *SCRIPTS, check=False)
    assert result.returncode == 0, result.stdout
