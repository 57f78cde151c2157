"""A Ray Tune callback that keeps a killed search restorable.

With `CheckpointConfig(num_to_keep=N)`, Ray deletes a trial's older checkpoint as soon as it
registers a newer one, but records the newer one in the experiment snapshot only later. A search
killed in between (SIGKILL, a lost node, a SLURM time limit) restores the trial from the deleted
checkpoint, and the trial fails with "Could not recover from checkpoint as it does not exist on
storage anymore" although its newer checkpoint sits next to it. Before Ray restores a trial, this
callback puts that newer checkpoint where Ray looks. Imported only by `chexdist tune` (it needs Ray).
"""

from __future__ import annotations

import logging
import re

import pyarrow.fs as pafs
from ray.tune import Callback

log = logging.getLogger("chexdist")
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{6})$")


def replacement_for(missing: str, siblings: list[str]) -> str | None:
    """The checkpoint to restore instead of `missing`: the oldest of the trial's checkpoints that are
    newer. Ray registers (and so deletes for) a checkpoint only after it is fully written, so that one
    is complete; a newer one may be a half-written upload that the kill cut short."""
    wanted = CHECKPOINT_DIR.match(missing.rstrip("/").rsplit("/", 1)[-1])
    if wanted is None:
        return None
    newer = sorted((int(m.group(1)), name) for name in siblings if (m := CHECKPOINT_DIR.match(name)) and int(m.group(1)) > int(wanted.group(1)))
    return newer[0][1] if newer else None


class RestoreFromNextCheckpoint(Callback):
    """Replaces a restored trial's deleted checkpoint by the trial's next one (see the module)."""

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return
        parent = path.rsplit("/", 1)[0]
        entries = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        found = replacement_for(path, [e.base_name for e in entries if e.type == pafs.FileType.Directory])
        if found is None:
            return  # nothing newer either: Ray's own error names the missing checkpoint
        partial = f"{path}.restoring"
        if fs.get_file_info(partial).type != pafs.FileType.NotFound:
            fs.delete_dir(partial)
        pafs.copy_files(f"{parent}/{found}", partial, source_filesystem=fs, destination_filesystem=fs)
        fs.move(partial, path)
        log.warning("trial %s: its recorded checkpoint %s was deleted before the search was killed; "
                    "restoring from the newer %s instead", trial.trial_id, path.rsplit("/", 1)[-1], found)
