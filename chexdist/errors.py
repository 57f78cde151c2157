"""The one exception type the CLI turns into a one-line message and exit code 2, and the exit codes
of `chexdist` and `chexdist/train.py`."""

EXIT_BAD_INPUT = 2  # refused before any work, one line naming the file, row or key
EXIT_REQUEUE = 75  # EX_TEMPFAIL: SIGTERM/SIGUSR1 arrived, a checkpoint was saved; requeue and --resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (a checkpoint was saved if training had started)


class ChexdistError(ValueError):
    """Bad input or configuration; the message names the file, row or key and the fix."""
