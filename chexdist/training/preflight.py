"""Every check a run needs before training, and that needs no process group: the config, the shards
manifest, the run folder against --resume and the resume state. `chexdist train --nproc N` runs
`preflight` before starting any worker; `engine.fit` runs it on rank 0 (`agreed_preflight`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chexdist.config import Config, config_from_dict, config_to_dict, load_yaml
from chexdist.data.mixture import check_union_leakage, load_sources
from chexdist.data.shardformat import split_shards
from chexdist.errors import ChexdistError, SameOnAllRanks
from chexdist.training.checkpoint import list_checkpoints, resolve_resume
from chexdist.training.trackers import check_trackers

# Keys a --resume may change. data.num_workers changes the data plan: allowed at an epoch boundary,
# refused mid-epoch by the shape check (see checkpoint.SHAPE_KEYS).
RESUMABLE_KEYS = {"train.epochs", "data.num_workers", "data.shards", "eval.bootstrap", "train.log_every_s", "train.log_with",
                  "train.log_every_steps"}


@dataclass
class Preflight:
    """What `preflight` checked and decided: the manifest, and the checkpoint to resume (None: fresh)."""

    manifest: dict
    resume_from: Path | None


def preflight(config: Config, out: str | os.PathLike, resume: bool | str | None) -> Preflight:
    """Every check that needs no process group: config, shards manifest, run folder against --resume,
    resume state. `chexdist train --nproc N` runs it before starting any worker; `fit` runs it on rank 0."""
    out = Path(out)
    if not config.data.shards:
        raise ChexdistError("config key 'data.shards' is empty; pass --shards DIR or --set data.shards=DIR")
    check_trackers(config.train.log_with)
    manifest = load_sources(config.data.shards, config.data.shard_weights)
    check_union_leakage(manifest)
    for split in ("train", "val"):
        if sum(entry["samples"] for entry in split_shards(manifest, split, str(config.data.shards))) == 0:
            raise ChexdistError(f"{config.data.shards}: the {split} split is empty; repack with a {split} split")
    resume_from = resolve_resume(out, resume)
    if resume_from is None and resume != "auto" and list_checkpoints(out):
        raise ChexdistError(f"{out}: already has checkpoints; pass --resume to continue it or choose a new --out")
    if resume_from is not None:
        _check_resume_config(out, config)
    return Preflight(manifest, resume_from)


def agreed_preflight(accelerator, config: Config, out: Path, resume: bool | str | None) -> Preflight:
    """Rank 0 runs `preflight` and every rank follows its answer, so nodes never disagree about the
    run folder (which checkpoint is latest, whether there is one). Multi-node needs a shared filesystem."""
    if accelerator.num_processes == 1:
        return preflight(config, out, resume)
    from accelerate.utils import broadcast_object_list

    answer: list[Preflight | str | None] = [None]
    if accelerator.is_main_process:
        try:
            answer[0] = preflight(config, out, resume)
        except ChexdistError as exc:
            answer[0] = str(exc)
    broadcast_object_list(answer)
    if isinstance(answer[0], str):
        raise SameOnAllRanks(answer[0])
    return answer[0]


def _check_resume_config(out: Path, config: Config) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(config_to_dict(config_from_dict(load_yaml(saved_path, "run config"))))
    now = _flatten(config_to_dict(config))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        first = changed[0]
        raise ChexdistError(
            f"{saved_path}: --resume with changed settings ({', '.join(changed[:5])}; e.g. {first} was "
            f"{saved.get(first)!r}, now {now.get(first)!r}); resume with the run's settings or use a new --out"
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
