"""The signals that stop training, and the helper processes that must not act on them.

SIGTERM and SIGUSR1 (SLURM preemption, time limit, scancel) and SIGINT (Ctrl-C) make the training
process checkpoint at its next safe point (`engine.StopFlag`). They also reach its helpers: slurmstepd
signals every process of a step and a terminal every process of its foreground group. The helpers
(shard reader commands, DataLoader workers, multiprocessing's resource tracker) must keep serving until
that checkpoint: one that dies loses its shard's remaining samples, or takes the loader down with it.
They end with the training process instead: a reader by SIGPIPE or EOF once its reader side is gone,
a worker when the loader shuts it down or sees its parent gone, anything left by SLURM's SIGKILL.
Standard library only: `shardformat` (imported by pack) uses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block the stop signals in this thread meanwhile: processes started inside inherit the mask, which
    survives exec (a stop signal stays pending in them instead of acting). One arriving here meanwhile
    is delivered once the mask is restored, not lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignoring_shell(command: str) -> list[str]:
    """argv running shell `command` as `sh -c` does, with the stop signals ignored from its first
    instruction (this file run as a script, which then execs the shell). Ignored dispositions survive
    exec, and a non-interactive shell cannot trap signals ignored on entry, so the command's processes
    keep them. A blocked mask alone is not enough: dash (Debian's /bin/sh) clears the mask it starts
    with, and a signal pending then ends it. Started inside `blocked()`, a signal that arrives before
    the dispositions are set waits and is then discarded. Costs one short Python start per reader."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), command]


def serve_through_stop_signals() -> None:
    """In a DataLoader worker (`worker_init_fn`, main thread): ignore the stop signals for good.

    SIGINT and SIGUSR1 are ignored. SIGTERM stays blocked (the worker was started with it blocked,
    see `data._start_workers`) and a thread takes it: one from the process that started the worker
    (multiprocessing's terminate, the loader's last resort) ends it as torch's own handler would;
    any other is dropped.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()  # the training process, also under forkserver
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps torch's handler, which ends the worker
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    threading.Thread(target=_end_on_sigterm_from, args=(parent.pid if parent else os.getppid(),),
                     name="chexdist-sigterm", daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo([signal.SIGTERM]).si_pid == parent:
            os._exit(0)


if __name__ == "__main__":  # see ignoring_shell; SIGPIPE and SIGXFSZ get back the default Python changed
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    os.execl("/bin/sh", "sh", "-c", sys.argv[1])
