"""`chexdist train --nproc N`: start N local training processes with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), from which Accelerate sets up
DDP (MULTI_GPU with CUDA; MULTI_CPU with ACCELERATE_USE_CPU=1).

Owning the processes, instead of going through `accelerate launch` (torchrun), is what lets the exit
codes and signals through: torchrun turns any failed worker into exit 1 plus a ChildFailedError
traceback, does not handle SIGUSR1 (it dies of it), and kills workers 30 s after forwarding SIGTERM.
Here each worker runs in its own session, so a terminal's Ctrl-C reaches only this parent, which
forwards every SIGINT/SIGTERM/SIGUSR1 once to each worker; the exit code is the first failing
worker's (2 stays 2, 75 stays 75, a death by signal S is 128+S).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from chexdist.utils.stopsignals import STOP_SIGNALS, held_stop_signals

FORWARDED = STOP_SIGNALS
GRACE_S = 30.0  # once a worker has failed, how long the others get to exit before they are killed
POLL_S = 0.2
PARENT_ENV = "CHEXDIST_LAUNCHER_PID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int, cpu: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun's variables for local rank `rank` of `nproc` on one machine."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{PARENT_ENV: str(os.getpid())})
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def run_workers(cmd: list[str], nproc: int, cpu: bool) -> int:
    """Run `cmd` as ranks 0..nproc-1 and return the launch's exit code (see module doc)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    forwarded: list[int] = []

    def forward(signum, frame) -> None:
        forwarded.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        # workers start with the signals blocked: one sent before a worker can handle it stays
        # pending (not fatal) until `stopsignals.hold_stop_signals` unblocks it there
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            for rank in range(nproc):
                procs.append(subprocess.Popen(cmd, env=worker_env(rank, nproc, port, cpu), start_new_session=True))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        for signum in held_stop_signals():  # arrived during the parent's preflight
            forward(signum, None)
        return _wait(procs, forwarded)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], forwarded: list[int]) -> int:
    first_failure: tuple[int, int] | None = None  # (rank, exit code)
    failed_at = 0.0
    while True:
        codes = [proc.poll() for proc in procs]
        if first_failure is None:
            failing = [(rank, code) for rank, code in enumerate(codes) if code]
            if failing:
                first_failure, failed_at = failing[0], time.monotonic()
        if all(code is not None for code in codes):
            break
        if first_failure is not None and time.monotonic() - failed_at > GRACE_S:
            stuck = [rank for rank, code in enumerate(codes) if code is None]
            for rank in stuck:
                procs[rank].kill()
            rank, code = first_failure
            print(f"chexdist: rank {rank} exited with {_describe(code)}; killed rank(s) {', '.join(map(str, stuck))} "
                  f"still running {GRACE_S:.0f} s later", file=sys.stderr)
            break
        time.sleep(POLL_S)
    if first_failure is None:
        return 0
    rank, code = first_failure
    if code > 0:
        return code
    signum = -code
    if signum not in forwarded:
        print(f"chexdist: rank {rank} was killed by {_describe(code)}", file=sys.stderr)
    return 128 + signum


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@contextlib.contextmanager
def process_group_released() -> Iterator[None]:
    """Around a command's whole run: destroy the default process group before the interpreter exits.
    Left to exit, a gloo worker thread can still be freeing a finished all-gather's tensors while
    Python finalizes, and the process dies of SIGABRT ("terminate called without an active exception")
    after its work is done. Destroying the group joins those threads first."""
    try:
        yield
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def follow_launcher() -> None:
    """In a worker started by `run_workers`: get SIGTERM when the launcher dies (Linux), so a killed
    launcher leaves a checkpoint instead of orphans that train on."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
