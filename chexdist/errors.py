"""The one exception type the CLI turns into a one-line message and exit code 2."""


class ChexdistError(ValueError):
    """Bad input or configuration; the message names the file, row or key and the fix."""
