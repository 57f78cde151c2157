"""The sbatch scripts on a real one-node SLURM cluster (slurmctld + slurmd + munged, started by
slurm/local-cluster.sh, installed from Debian when missing): CPU training with 2 processes, preemption
that requeues and resumes, the pack array job, two srun tasks acting as two machines, bad input.
If SLURM cannot start, every test here fails with the reason (never skipped)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = REPO / "slurm"
SCRIPTS = sorted(str(p) for p in SLURM.iterdir() if p.suffix in (".sh", ".sbatch"))
# Small enough for 2 cores, long enough (4 epochs of 11 steps per rank) to be signalled mid-run.
SETS = "train.epochs=4 data.batch_size=8"


def sh(*cmd: str, env: dict | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}: {result.stdout[-1500:]}{result.stderr[-1500:]}")
    return result


class Cluster:
    """The client side of the local cluster: submit with the right environment, wait, inspect."""

    def __init__(self, env: dict[str, str], state: Path):
        self.env, self.state = env, state

    def sbatch(self, *args: str, settings: dict[str, str], workdir: Path) -> str:
        """Submit train.sbatch with `settings` as environment variables (what --export=ALL passes on)."""
        out = sh("sbatch", "--parsable", f"--chdir={workdir}", *args, str(SLURM / "train.sbatch"),
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


def test_preempted_job_requeues_resumes_and_finishes_like_an_unbroken_run(cluster, shards, unbroken, tmp_path):
    out = tmp_path / "run"
    job_id, log = train_job(cluster, tmp_path, out, "--cpus-per-task=2", SHARDS=str(shards), PROCS_PER_NODE="2")

    def lines() -> int:
        return len(epochs(out)) if (out / "metrics.jsonl").exists() else 0

    wait_for(lambda: lines() >= 1, "epoch 1", log)
    cluster.signal_batch(job_id)  # during epoch 2's training steps
    wait_for(lambda: "resumed from" in (log.read_text() if log.exists() else "") and lines() >= 2,
             "the restarted job's first epoch", log)
    cluster.signal_batch(job_id)  # and again, in the restarted job
    info = cluster.wait(job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "2", text[-3000:]
    assert "restart 1 on" in text and "restart 2 on" in text
    # Each restart loaded the checkpoint that the preempted attempt reported in OUT/PREEMPTED.
    saved = [json.loads(m)["checkpoint"] for m in re.findall(r"checkpoint saved \((\{.*?\})\); requeueing", text)]
    resumed = re.findall(r"resumed from (\S+) \(", text)
    assert len(saved) == 2 and resumed == saved, text[-3000:]
    assert all(Path(c).name.startswith("step") for c in saved)
    assert not (out / "PREEMPTED").exists()
    # Not from scratch: every epoch exactly once, with the unbroken run's numbers.
    got, want = epochs(out), epochs(unbroken)
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert (a["step"], a["val_auc_mean"], a["val_loss"], a["train_loss"]) == (b["step"], b["val_auc_mean"], b["val_loss"], b["train_loss"])
    got_weights, want_weights = load_file(out / "best.safetensors"), load_file(unbroken / "best.safetensors")
    assert got_weights.keys() == want_weights.keys()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)


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
