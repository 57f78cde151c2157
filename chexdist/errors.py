"""Exceptions that the CLI turns into a one-line message and an exit code, and the exit codes of
`chexdist` and `chexdist/train.py`."""

import signal
from pathlib import Path

EXIT_BAD_INPUT = 2  # refused before any work, one line naming the file, row or key
EXIT_REQUEUE = 75  # EX_TEMPFAIL: SIGTERM/SIGUSR1 arrived, a checkpoint was saved; requeue and --resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (a checkpoint was saved if training had started)


class ChexdistError(ValueError):
    """Bad input or configuration; the message names the file, row or key and the fix."""


class Preempted(Exception):
    """A stop signal arrived and a checkpoint was saved; `exit_code` is 75 (requeue and --resume) for
    SIGTERM/SIGUSR1 and 130 for SIGINT. Every rank raises it at the same step."""

    def __init__(self, checkpoint: Path, signum: int = signal.SIGTERM):
        self.checkpoint, self.signum = checkpoint, signal.Signals(signum)
        super().__init__(f"{self.signum.name}: saved checkpoint {checkpoint}; rerun with --resume to continue")

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_REQUEUE


class SameOnAllRanks(ChexdistError):
    """Raised identically by every rank (a rank-0 decision or a cross-rank agreement), so one report
    from rank 0 is the whole story."""


class NonFiniteLoss(SameOnAllRanks):
    pass
