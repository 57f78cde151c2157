"""Training progress that fits where it runs: a tqdm bar on a terminal, plain timed lines in a log.

A bar redirected to a file is one huge line of `\\r`-separated states; SLURM logs and `tee` need
short lines instead. So the bar is drawn only when both stdout and stderr are terminals, and
otherwise one line is printed every `log_every_s` seconds (step, images/s, loss, lr, ETA).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def interactive() -> bool:
    """True when progress bars would reach a person at a terminal, not a file or pipe."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EpochProgress:
    """Progress of one epoch of `total` batches, starting at `initial` (a resumed epoch).

    enabled=False shows nothing (--no-progress, or a rank other than the local main one).
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, log_every_s: float, images_per_batch: int,
                 bar: bool | None = None, write: Callable[[str], None] | None = None):
        self.total, self.done, self.desc = total, initial, desc
        self.enabled, self.log_every_s, self.images_per_batch = enabled, log_every_s, images_per_batch
        self.write = write or (lambda line: print(line, flush=True))
        self.started = self.last = time.perf_counter()
        self.first = initial
        self.bar = None
        if enabled and (interactive() if bar is None else bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False)

    def update(self, loss: Callable[[], float], lr: float, step: int) -> None:
        """One batch done. `loss` is called only when a line or the bar's postfix is shown."""
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            if now - self.last >= 1.0:
                self.bar.set_postfix(loss=f"{loss():.4f}", lr=f"{lr:.1e}")
                self.last = now
        elif now - self.last >= self.log_every_s and self.done < self.total:
            self.write(self.line(loss(), lr, step, now))
            self.last = now

    def line(self, loss: float, lr: float, step: int, now: float) -> str:
        batches = self.done - self.first
        elapsed = max(now - self.started, 1e-9)
        eta = (self.total - self.done) * elapsed / max(batches, 1)
        return (f"{self.desc}  batch {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)  step {step}  "
                f"{batches * self.images_per_batch / elapsed:.1f} img/s  loss {loss:.4f}  lr {lr:.2e}  "
                f"ETA {_clock(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
