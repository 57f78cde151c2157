"""What changes with the number of processes: resume on another shape, global batch and lr, the
precision in force, refused Accelerate types, normalization from the model (issue 9)."""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chexdist.config import AugConfig, load_config, resolve_batch
from chexdist.errors import ChexdistError
from chexdist.training.launcher import free_port
from tests.conftest import REPO

TRAIN_PY = str(REPO / "chexdist" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
    ENV.pop(_key, None)


def run(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or ENV, **kw)


def train_args(train_shards: Path, out: Path, *sets: str) -> list[str]:
    args = [TRAIN_PY, "--recipe", "tiny", "--shards", str(train_shards), "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


def one_process(train_shards: Path, out: Path, *sets: str) -> list[str]:
    return [sys.executable, *train_args(train_shards, out, *sets)]


def two_processes(train_shards: Path, out: Path, port: int, *sets: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(port), *train_args(train_shards, out, *sets)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True)["train_state"]


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))


def _rank_processes(launcher: int) -> list[int]:
    """The launcher's direct children running train.py (the ranks, not their DataLoader workers)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("PPid:"))
            cmdline = (status.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if int(ppid) == launcher and "train.py" in cmdline:
            found.append(int(status.parent.name))
    return found


# ------------------------------------------------------------------------- batch size and lr


def test_global_batch_splits_over_processes_and_accumulation():
    chexnet = load_config("chexnet")
    assert chexnet.data.global_batch_size == 16 and load_config("dannynet").data.global_batch_size == 8
    plans = {world: resolve_batch(chexnet, world) for world in (1, 2, 4, 8, 16)}
    assert {w: (p.batch_size, p.grad_accum, p.global_batch) for w, p in plans.items()} == {
        1: (16, 1, 16), 2: (8, 1, 16), 4: (4, 1, 16), 8: (2, 1, 16), 16: (1, 1, 16)}
    assert all(p.lr == 1e-3 for p in plans.values())

    capped = load_config("tiny", overrides=["data.global_batch_size=64", "data.batch_size=12"])
    plan = resolve_batch(capped, 2)  # 32 per process does not fit 12: accumulate 4 x 8
    assert (plan.batch_size, plan.grad_accum, plan.global_batch) == (8, 4, 64)
    at_least = load_config("tiny", overrides=["data.global_batch_size=64", "train.grad_accum=2"])
    assert (resolve_batch(at_least, 4).batch_size, resolve_batch(at_least, 4).grad_accum) == (8, 2)

    per_process = load_config("tiny", overrides=["data.batch_size=6", "train.grad_accum=3"])
    assert resolve_batch(per_process, 4).global_batch == 72

    with pytest.raises(ChexdistError, match=r"'data.global_batch_size': 16 does not split over 3 process.*multiple of 3 \(e.g. 15\)"):
        resolve_batch(chexnet, 3)
    with pytest.raises(ChexdistError, match="does not split over 32"):
        resolve_batch(chexnet, 32)


def test_lr_scaling_against_the_reference_batch():
    base = ["data.global_batch_size=64", "data.batch_size=64", "optim.lr=1e-3", "optim.lr_reference_batch=16"]
    assert resolve_batch(load_config("tiny", overrides=base), 1).lr == 1e-3  # off by default
    linear = resolve_batch(load_config("tiny", overrides=[*base, "optim.lr_scaling=linear"]), 2)
    assert linear.lr == pytest.approx(4e-3)
    root = resolve_batch(load_config("tiny", overrides=[*base, "optim.lr_scaling=sqrt"]), 2)
    assert root.lr == pytest.approx(2e-3)
    per_process = load_config("tiny", overrides=["data.batch_size=8", "optim.lr_scaling=linear", "optim.lr_reference_batch=8"])
    assert resolve_batch(per_process, 4).lr == pytest.approx(4e-3)  # global 32 = 8 x 4
    with pytest.raises(ChexdistError, match="'optim.lr_reference_batch': must be > 0 with optim.lr_scaling=sqrt"):
        load_config("tiny", overrides=["optim.lr_scaling=sqrt"])


# ------------------------------------------------------------------------------ duplications


def test_defaults_and_names_have_one_home():
    from chexdist.data import nih, synth
    from chexdist.data.transforms import build_transform

    defaults = inspect.signature(build_transform).parameters
    aug = AugConfig()
    for key in ("scale_min", "brightness", "contrast", "degrees", "translate"):
        assert defaults[key].default == getattr(aug, key), key
    assert synth.DATA_ENTRY_HEADER == ",".join(nih.DATA_ENTRY_COLUMNS) + ","
    assert (synth.TRAIN_VAL_LIST, synth.TEST_LIST) == (nih.TRAIN_VAL_LIST, nih.TEST_LIST)


# ------------------------------------------------------------------------------ precision


PRECISION_CASES = [  # train.precision, the launcher's --mixed_precision (its env var), in force, notice said
    ("no", "bf16", "no", True),
    ("auto", "bf16", "bf16", False),
    ("auto", None, "no", False),
    ("bf16", "no", "bf16", True),
    ("fp16", None, "fp16", False),
]
PRECISION_PROBE = """
import contextlib, io, json, os, sys
from accelerate.state import AcceleratorState
from chexdist.config import load_config
from chexdist.training.engine import accelerator_for
for precision, launcher, _, _ in json.loads(sys.argv[1]):
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    if launcher:
        os.environ["ACCELERATE_MIXED_PRECISION"] = launcher
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        acc = accelerator_for(load_config("tiny", overrides=[f"train.precision={precision}"]))
    print(json.dumps([str(acc.mixed_precision), "the launcher's --mixed_precision" in said.getvalue()]))
    AcceleratorState._reset_state(reset_partial_state=True)
"""


@pytest.mark.slow
def test_precision_is_passed_explicitly():
    done = run([sys.executable, "-c", PRECISION_PROBE, json.dumps(PRECISION_CASES)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert got == [[in_force, notice] for _, _, in_force, notice in PRECISION_CASES]


@pytest.mark.slow
def test_unsupported_distributed_type_is_refused(train_shards, tmp_path):
    """FSDP/DeepSpeed need GPUs; the state Accelerate would report for them is set by hand here."""
    script = f"""
from accelerate import Accelerator
from accelerate.utils import DistributedType
from chexdist.config import load_config
from chexdist.training.engine import fit
from chexdist.errors import ChexdistError
acc = Accelerator(mixed_precision="no")
acc.state.distributed_type = DistributedType.FSDP
try:
    fit(load_config("tiny", overrides=["data.shards={train_shards}"]), r"{tmp_path / 'fsdp'}", accelerator=acc, progress=False)
except ChexdistError as e:
    print("REFUSED", e)
"""
    done = run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("REFUSED")]
    assert "distributed type FSDP is not supported" in line
    assert not (tmp_path / "fsdp").exists()


# -------------------------------------------------- one process: what metrics and best.json record


@pytest.mark.slow
def test_one_process_records_batch_lr_precision_and_normalization(train_shards, tmp_path):
    out = tmp_path / "one"
    env = dict(ENV, ACCELERATE_MIXED_PRECISION="bf16")  # a launcher default that config.yaml does not say
    done = run(one_process(train_shards, out, "train.epochs=1", "data.max_train_batches=3", "data.global_batch_size=24",
                           "data.batch_size=16", "optim.lr_scaling=linear", "optim.lr_reference_batch=12"), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 24 = 12 per process x 1 x grad_accum 2" in done.stdout
    (record,) = metrics(out)
    assert record["precision"] == "no"
    assert (record["global_batch"], record["batch_size"], record["grad_accum"], record["step"]) == (24, 12, 2, 2)
    assert record["base_lr"] == pytest.approx(2e-3) and record["lr"] == pytest.approx(2e-3)
    best = json.loads((out / "best.json").read_text())
    assert best["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}  # timm's test_resnet config, not ImageNet's
    assert (best["global_batch"], best["precision"], best["world_size"]) == (24, "no", 1)
    assert best["lr"] == pytest.approx(2e-3)
    assert best["config"]["data"]["batch_size"] == 16  # the config as asked; the plan is recorded beside it
    state = trainer_state(checkpoints(out)[-1])
    assert (state["world_size"], state["batch_size"], state["grad_accum"], state["num_workers"]) == (1, 12, 2, 0)


# ------------------------------------------------------------------- resume on another shape


@pytest.mark.slow
def test_resume_on_another_shape(train_shards, tmp_path):
    """2 processes preempted mid-epoch; 1 process refuses that checkpoint with one line; 2 processes
    finish the epoch; 1 process then continues from the epoch boundary, with the same global batch."""
    out = tmp_path / "shape"
    sets = ("data.global_batch_size=8", "data.batch_size=8", "train.checkpoint_every=2", "train.keep_checkpoints=20",
            "data.num_workers=1")
    env2 = dict(ENV, ACCELERATE_USE_CPU="1")
    proc = subprocess.Popen(two_processes(train_shards, out, free_port(), *sets, "train.epochs=1"), cwd=REPO, env=env2,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints").is_dir() or not checkpoints(out):
        assert time.time() < deadline and proc.poll() is None, "no mid-epoch checkpoint appeared"
        time.sleep(0.02)
    ranks = _rank_processes(proc.pid)
    assert len(ranks) == 2, ranks
    for pid in ranks:  # as SLURM signals every task of the step
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run was expected to be preempted"
    assert "rerun with --resume" in stderr, stderr[-3000:]
    mid = checkpoints(out)[-1]
    saved = trainer_state(mid)
    assert saved["batch"] > 0 and saved["epoch"] == 0, mid.name
    assert (saved["world_size"], saved["batch_size"], saved["num_workers"], saved["grad_accum"]) == (2, 4, 1, 1)

    refused = run([*one_process(train_shards, out, *sets, "train.epochs=1"), "--resume"], timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "saved mid-epoch" in lines[0] and "processes 2 -> 1" in lines[0] and "per-process batch 4 -> 8" in lines[0]
    assert "resume it with 2 process(es) and data.num_workers=1" in lines[0]
    assert checkpoints(out)[-1] == mid and not (out / "metrics.jsonl").exists()

    finished = run([*two_processes(train_shards, out, free_port(), *sets, "train.epochs=1"), "--resume"], env=env2, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "RNG states not restored" not in finished.stdout
    boundary = checkpoints(out)[-1]
    assert boundary.name.endswith("epoch0001-batch000000")
    steps_epoch1 = trainer_state(boundary)["step"]

    single = run([*one_process(train_shards, out, *sets, "train.epochs=2", "data.num_workers=0"), "--resume"], timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    said = [l for l in single.stdout.splitlines() if "another shape" in l]
    assert said == ["resuming at an epoch boundary on another shape (processes 2 -> 1, data.num_workers 1 -> 0, "
                    "per-process batch 4 -> 8): the next epochs are planned for the new one"]
    assert any(l.startswith("RNG states not restored: ") and "2 rank state(s)" in l and "1 process(es)" in l
               for l in single.stdout.splitlines())
    first, second = metrics(out)
    assert (first["world_size"], first["batch_size"], first["global_batch"]) == (2, 4, 8)
    assert (second["world_size"], second["batch_size"], second["global_batch"]) == (1, 8, 8)
    train_samples = json.loads((train_shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    per_epoch = math.ceil(train_samples / 8)  # same global batch: same optimizer steps per epoch on either shape
    assert steps_epoch1 == per_epoch and second["step"] == 2 * per_epoch
    last = trainer_state(checkpoints(out)[-1])
    assert (last["world_size"], last["batch_size"], last["num_workers"]) == (1, 8, 0)
