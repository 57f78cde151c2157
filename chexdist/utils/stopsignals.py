"""The signals that stop training, and the helper processes that must not act on them.

SIGTERM and SIGUSR1 (SLURM preemption, time limit, scancel) and SIGINT (Ctrl-C) make the training
process checkpoint at its next safe point (`StopFlag`, which the loop asks). They also reach its helpers: slurmstepd
signals every process of a step and a terminal every process of its foreground group. The helpers
(shard reader commands, DataLoader workers, multiprocessing's resource tracker) must keep serving until
that checkpoint: one that dies loses its shard's remaining samples, or takes the loader down with it.
They end with the training process instead: a reader by SIGPIPE or EOF once its reader side is gone,
a worker when the loader shuts it down or sees its parent gone, anything left by SLURM's SIGKILL.
Standard library only, imported lazily (logging too): `shardformat` (imported by pack) uses it, and
`ignoring_shell` runs this file as a script under `-I -S` before every shard reader.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _second_ctrl_c_kills(signum: int) -> None:
    """After a first SIGINT (which asks for a checkpoint), SIGINT gets its default action again, so a
    second Ctrl-C ends the process at once (a checkpoint is written under a temp name, so none is
    left half-done)."""
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


class StopFlag:
    """Records the first SIGTERM/SIGUSR1 (SLURM preemption) or SIGINT (Ctrl-C) so the loop checkpoints
    at the next safe point; a second Ctrl-C ends the process at once. Shard readers and DataLoader
    workers receive these signals too and ignore them: the loop's rank acts (see the module doc)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, announce: bool = True) -> None:
        import logging

        self.signum = 0
        self.announce = announce
        self._log = logging.getLogger("chexdist")
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            for signum in held_stop_signals():  # arrived while train.py was starting
                self._handle(signum, None)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        _second_ctrl_c_kills(signum)
        if self.signum:
            return
        self.signum = signum
        if self.announce:
            again = "; Ctrl-C again aborts without saving" if signum == signal.SIGINT else ""
            self._log.warning("received %s: will checkpoint and stop at the next safe point%s",
                              signal.Signals(signum).name, again)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class HeldSignals:
    """The stop signals that arrived while held (`hold_stop_signals`), before a StopFlag could take
    them: in a worker during train.py's heavy imports, in `chexdist train` during its preflight."""

    def __init__(self) -> None:
        self._signums: list[int] = []

    def catch(self, signum, frame=None) -> None:
        self._signums.append(signum)
        _second_ctrl_c_kills(signum)

    def take(self) -> list[int]:
        """The signals caught so far, each reported once."""
        caught, self._signums = self._signums, []
        return caught


_HELD = HeldSignals()  # one per process: signal handlers are process-wide


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[None]:
    """From before the heavy imports: remember SIGINT/SIGTERM/SIGUSR1 instead of dying of them, until
    the training loop's StopFlag (or `launcher.run_workers`) takes them over (`held_stop_signals`).
    Unblocks them too: `run_workers` starts its workers with them blocked."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _HELD.catch) for sig in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _HELD.take()


def held_stop_signals() -> list[int]:
    """The signals `hold_stop_signals` caught (each reported once)."""
    return _HELD.take()


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
    see `data.loader`) and a thread takes it: one from the process that started the worker
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
