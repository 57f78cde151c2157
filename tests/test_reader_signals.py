"""Shard readers and DataLoader workers do not act on the stop signals: SLURM signals every process of a
step and Ctrl-C the whole foreground process group, yet only the training process may decide to stop.

Each run is a script in its own session (so pytest is not signalled) that trains nothing: under the
loop's StopFlag (`chexdist.utils.stopsignals`) it reads one train epoch through a `pipe:cat` template, and after a few batches
signals its whole process group (readers and workers included): SIGUSR1 and SIGINT itself, then
SIGTERM by `kill` from another session."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_data import EVAL, write_shards

SIGNAL_AT = 2  # batches read before the signals
BATCH = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 train shards of 40 samples (about 100 KB each, more than a pipe holds), so readers are still
    writing when the signals come."""
    root = tmp_path_factory.mktemp("reader-signals")
    write_shards(root, {"train": [40, 40, 40, 40]})
    return root


def template(root: Path) -> str:
    return f"pipe:cat {root}/{{name}}"


def live_readers() -> list[int]:
    """Pids of the `cat` shard readers in this process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if stat[stat.index("(") + 1:stat.rindex(")")] == "cat" and int(fields[2]) == os.getpgrp():
            found.append(int(entry.name))
    return found


def read_epoch(root: Path, context: str | None, workers: int, signal_at: int = -1, then_die: bool = False) -> dict:
    """One epoch's batches as a checksum; at batch `signal_at` the stop signals go to the process group."""
    from chexdist.data.loader import build_train_loader

    loader, batches = build_train_loader(template(root), BATCH, EVAL, workers, 1, 0, seed=3, epoch=0, shuffle_buffer=4,
                                         multiprocessing_context=context)
    digest, readers = hashlib.sha256(), []
    for i, (images, labels) in enumerate(loader):
        digest.update(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        if i == signal_at:
            deadline = time.monotonic() + 10
            while not (readers := live_readers()) and time.monotonic() < deadline:
                time.sleep(0.05)  # between two shards: wait for the next reader
            for sig in (signal.SIGUSR1, signal.SIGINT):
                os.killpg(0, sig)
                time.sleep(0.2)
            # from outside, as slurmstepd sends it (a worker takes its parent's SIGTERM as terminate())
            subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgrp()}"], check=True, start_new_session=True)
            time.sleep(0.2)
            if then_die:
                print(json.dumps({"readers": readers}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    return {"checksum": digest.hexdigest(), "batches": batches, "read": i + 1, "skipped": loader.skipped, "readers": readers}


def main() -> None:
    """The signalled run (in its own session): python -c 'from tests.test_reader_signals import main; main()' ROOT CONTEXT WORKERS [die]."""
    from chexdist.utils.stopsignals import StopFlag

    root, context, workers = Path(sys.argv[1]), sys.argv[2] or None, int(sys.argv[3])
    with StopFlag() as stop:
        result = read_epoch(root, context, workers, SIGNAL_AT, then_die=sys.argv[4:] == ["die"])
        result["stopped_by"] = signal.Signals(stop.signum).name if stop.signum else None
    print(json.dumps(result), flush=True)


def run_signalled(root: Path, context: str | None, workers: int, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from tests.test_reader_signals import main; main()", str(root), context or "",
                             str(workers), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        left = wait_empty(proc.pid, 30)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), left


def wait_empty(session: int, timeout: float) -> int:
    """How many processes are still in process group `session` after waiting up to `timeout` s for it to empty."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return 0
        if time.monotonic() > deadline:
            return len([p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgrp(p) == session])
        time.sleep(0.2)


def _pgrp(proc: Path) -> int:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[2])


@pytest.fixture(scope="module")
def unsignalled(shards) -> dict[int, str]:
    """The checksum of the epoch read here without signals, by worker count (batches depend on it)."""
    return {workers: read_epoch(shards, None, workers)["checksum"] for workers in (0, 2)}


@pytest.mark.slow
@pytest.mark.parametrize(("context", "workers"), [("fork", 2), ("spawn", 2), ("forkserver", 2), (None, 0)])
def test_stop_signals_to_the_process_group_skip_no_sample(shards, unsignalled, context, workers):
    """USR1, INT and TERM to the whole group while `cat` readers are mid-shard: the StopFlag records
    USR1, the epoch finishes with no sample skipped and the unsignalled run's batches, and nothing of
    the run's process group (workers, readers) is left once it exits."""
    done, left = run_signalled(shards, context, workers)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["readers"], "no reader was running when the signals were sent"
    assert result["stopped_by"] == "SIGUSR1"
    assert result["skipped"] == 0, done.stderr[-3000:]
    assert result["read"] == result["batches"] == 40
    assert result["checksum"] == unsignalled[workers]
    assert left == 0


@pytest.mark.slow
def test_readers_end_with_their_training_process(shards):
    """Readers ignore the stop signals, so they must end another way: the training process killed
    outright (SIGKILL, after the signals) leaves no worker or reader behind."""
    done, left = run_signalled(shards, "fork", 2, "die")
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["readers"]
    assert left == 0


def _state(pid: int) -> str:
    """The process's state letter ('Z' once it has exited and waits to be reaped), or '' if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


@pytest.mark.slow
def test_a_worker_still_ends_on_sigterm_from_its_training_process(shards):
    """The DataLoader's last resort at shutdown is SIGTERM to a worker (multiprocessing's terminate):
    that one still ends it, while a SIGTERM from anyone else does not."""
    from chexdist.data.loader import build_train_loader

    loader, _ = build_train_loader(template(shards), BATCH, EVAL, 2, 1, 0, seed=3, epoch=0, shuffle_buffer=4)
    batches = iter(loader)
    try:
        next(batches)
        me = os.getpid()
        workers = [int(pid) for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split()
                   if Path(f"/proc/{pid}/comm").read_text().strip() == "pt_data_worker"]
        assert len(workers) == 2
        subprocess.run(["kill", "-s", "TERM", str(workers[0])], check=True, start_new_session=True)
        time.sleep(1)
        assert _state(workers[0]) not in ("", "Z")
        os.kill(workers[0], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _state(workers[0]) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(workers[0]) in ("", "Z")
        assert _state(workers[1]) not in ("", "Z")
    finally:
        batches.close()
