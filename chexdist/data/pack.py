"""Pack a dataset (NIH by default; any reader of `chexdist.data.datasets`) into WebDataset shards + manifest.json + errors.jsonl (`chexdist.data.verify` re-checks them).

Packing is deterministic (same inputs and settings -> byte-identical shards), parallel (each worker
process decodes, resizes, encodes and writes whole shards, so no image bytes cross processes and the
main process only collects records), and resumable at shard granularity: a shard is written as a hidden temp file and renamed when complete, and its record in
`.pack/` is written after the rename, so a re-run after a kill redoes only unfinished shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_write_json, atomic_write_jsonl, dumps_json, sha256_file
from chexdist.data.dicom import DicomError
from chexdist.data.images import ImageDecodeError, encode, image_statistics, load_gray8, resize_shorter
from chexdist.labels import LABELS
from chexdist.data.datasets import get_dataset
from chexdist.data.datasets.base import DatasetTable, LabelPolicy, apply_policy, filter_views, missing_by_parent
from chexdist.utils.progress import interactive
from chexdist.data.packmanifest import build_manifest
from chexdist.data.shardformat import MANIFEST, label_counts, sample_offsets
from chexdist.data.splits import METHODS, SPLITS, assign_split, read_split_list
from chexdist.data.shardindex import index_path, write_index

FORMATS = ("png", "jpg")
ERRORS = "errors.jsonl"
STATE_DIR = ".pack"


@dataclass(frozen=True)
class PackSettings:
    """Everything that determines the shards' bytes; a resumed pack must use the same values."""

    split: str = "random"
    size: int = 512
    format: str = "png"
    quality: int = 95
    shard_size: int = 1000
    limit: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    stratify: bool = False
    only_present: bool = False
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    dataset: str = "nih"
    dataset_options: dict = field(default_factory=dict)
    uncertain: str = "ignore"
    views: tuple[str, ...] | None = ("PA", "AP")

    @property
    def policy(self) -> LabelPolicy:
        return LabelPolicy(uncertain=self.uncertain, views=self.views)

    def list_files(self) -> dict[str, str]:
        """--split lists: split name -> list file."""
        return {"train": self.train_list, "val": self.val_list, "test": self.test_list}

    def validate(self) -> None:
        self.policy.validate()
        if self.split not in METHODS:
            raise ChexdistError(f"unknown --split {self.split!r}; choose one of {', '.join(METHODS)}")
        given = {k: v for k, v in self.list_files().items() if v}
        if self.split == "lists":
            absent = [f"--{k}-list" for k, v in self.list_files().items() if not v]
            if absent:
                raise ChexdistError(f"--split lists needs {', '.join(absent)} (image names, one per line)")
            for name, path in given.items():
                if not os.path.isfile(path):
                    raise ChexdistError(f"--{name}-list {path}: file not found")
        elif given:
            raise ChexdistError(f"--{next(iter(given))}-list is only used with --split lists")
        if self.format not in FORMATS:
            raise ChexdistError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.size < 0:
            raise ChexdistError(f"--size {self.size} must be >= 0 (0 keeps the original size)")
        if not 1 <= self.quality <= 100:
            raise ChexdistError(f"--quality {self.quality} must be in 1..100")
        if self.shard_size < 1:
            raise ChexdistError(f"--shard-size {self.shard_size} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ChexdistError(f"--limit {self.limit} must be >= 1")

    def fingerprint(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.split == "lists":
            out["list_sha256"] = {k: sha256_file(v) for k, v in self.list_files().items()}
        return out


@dataclass
class ShardPlan:
    name: str
    split: str
    rows: list[dict] = field(default_factory=list)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _number(value, cast):
    return None if value is None or pd.isna(value) else cast(value)


def _plain(value):
    """A table cell as JSON: numpy scalars as Python ones, NaN/None as None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _sample_meta(row: pd.Series, split: str) -> dict:
    return {
        "image": row["image"],
        "labels": [_number(row[label], int) for label in LABELS],
        "patient_id": _plain(row["patient_id"]),
        "follow_up": _number(row["follow_up"], int),
        "age": _number(row["age"], int),
        "sex": _plain(row["sex"]),
        "view": _plain(row["view"]),
        "orig_size": [_number(row.get("orig_width"), int), _number(row.get("orig_height"), int)],
        "pixel_spacing": [_number(row.get("spacing_x"), float), _number(row.get("spacing_y"), float)],
        "split": split,
    }


def read_dataset(root: str | os.PathLike, settings: PackSettings) -> DatasetTable:
    """The dataset's reader, then the label policy and the view filter; what they leave out is counted."""
    data = get_dataset(settings.dataset).read(Path(root), dict(settings.dataset_options))
    rows = apply_policy(data.rows, data.known, settings.policy)
    rows, dropped = filter_views(rows, settings.views)
    data.left_out = {**data.left_out, **dropped}
    if dropped or not data.missing_by_folder:
        data.missing_by_folder = missing_by_parent(rows, data.folder_depth) if rows["path"].isna().any() else {}
    data.rows = rows
    return data


def plan_shards(release: DatasetTable, settings: PackSettings) -> tuple[list[ShardPlan], pd.DataFrame]:
    """Split whole patients, order each split with a seeded shuffle (so shards mix patients), and
    cut it into shards. Returns the plans and the rows whose image file is missing.

    By default the split is made over the whole CSV (a partial download gets the patients' places
    in the full split); with only_present it is made over the rows whose files exist, as if the CSV
    listed only those, so the split fractions hold for what is actually packed."""
    lists = {k: read_split_list(v)[0] for k, v in settings.list_files().items()} if settings.split == "lists" else None
    table = release.rows
    present = table["path"].notna()
    missing = table[~present]
    if lists is not None:  # rows in no list are not packed at all, so not missing either
        missing = missing[missing["image"].isin(set().union(*lists.values()))]
    if settings.only_present:
        table = table[present]
        present = present[present]
    split = assign_split(
        table,
        settings.split,
        official=table["official_split"],
        dataset=release.name,
        val_fraction=settings.val_fraction,
        fractions=settings.fractions,
        seed=settings.seed,
        stratify=settings.stratify,
        lists=lists,
    )
    if not present.any():
        raise ChexdistError(
            f"{release.root}: none of the {len(table)} images listed in {release.main_source} is there "
            f"(e.g. {table['image'].iloc[0] if len(table) else '-'}); is --root the right download?"
        )
    packable = table[present].assign(split=split[present])
    if settings.limit is not None:
        packable = packable.iloc[: settings.limit]
    rng = np.random.default_rng(settings.seed)
    plans: list[ShardPlan] = []
    for name in SPLITS:
        part = packable[packable["split"] == name]
        part = part.iloc[rng.permutation(len(part))]
        rows = [
            {"path": r["path"], "key": r["key"], "meta": _sample_meta(r, name), "private": release.private_paths}
            for _, r in part.iterrows()
        ]
        for index, start in enumerate(range(0, len(rows), settings.shard_size)):
            plans.append(ShardPlan(shard_name(name, index), name, rows[start : start + settings.shard_size]))
    return plans, missing


def encode_sample(task: tuple) -> tuple[bytes | None, str | None, list[float] | None]:
    """Worker-process stage: read, convert to 8-bit gray, resize, encode. Returns (bytes, error,
    input statistics); the statistics let `chexdist predict` flag inputs unlike the training data.

    `task` is (path, size, format, quality, name, dicom_window): when `name` is given (the
    pseudonymised image name of a dataset whose paths are private) errors name the file by it."""
    path, size, fmt, quality, name, window = task
    try:
        original = load_gray8(path, name=name, dicom_window=window)
        image = resize_shorter(original, size) if size else original
        return encode(image, fmt, quality), None, image_statistics(original.shape, image)
    except FileNotFoundError:
        return None, "missing: file not found", None
    except DicomError as exc:  # counted by its kind ("DICOM truncated", ...), not as one "undecodable"
        return None, _hide(f"{exc.label}: {exc}", path, name), None
    except ImageDecodeError as exc:
        return None, _hide(f"undecodable: {exc}", path, name), None
    except OSError as exc:
        return None, _hide(f"unreadable: {(exc.strerror or type(exc).__name__) if name else exc}", path, name), None


def _hide(reason: str, path: str, name: str | None) -> str:
    """A reason with the file's path replaced by its name (a decoder may quote the path it opened)."""
    return reason.replace(os.fspath(path), name) if name else reason


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = "chexdist"
    tar.addfile(info, io.BytesIO(data))


def _write_shard(out: Path, plan: ShardPlan, settings: PackSettings) -> dict:
    """Encode and write one shard to a temp name, rename it, then record it. Returns the record.

    The record holds the shard's sample offset index (`offsets`), which the loader uses to open a
    shard at any sample without reading what precedes it.
    """
    final = out / plan.name
    temp = out / f".{plan.name}.tmp"
    metas, errors, stats = [], [], []
    with open(temp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            window = settings.dataset_options.get("dicom_window", "auto")
            for row in plan.rows:
                private = row.get("private", False)
                name = row["meta"]["image"] if private else None
                data, error, image_stats = encode_sample((row["path"], settings.size, settings.format, settings.quality, name, window))
                if error is not None:
                    errors.append({"image": row["meta"]["image"], "path": None if private else row["path"], "split": plan.split, "reason": error})
                    continue
                _tar_add(tar, f"{row['key']}.json", dumps_json(row["meta"], sort_keys=True).encode())
                _tar_add(tar, f"{row['key']}.{settings.format}", data)
                metas.append(row["meta"])
                stats.append(image_stats)
        f.flush()
        os.fsync(f.fileno())
    offsets = sample_offsets(temp)
    write_index(temp, index_path(final))
    os.replace(temp, final)
    record = {
        "name": plan.name,
        "split": plan.split,
        "samples": len(metas),
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
        "offsets": offsets,
        "patients": sorted({m["patient_id"] for m in metas}),
        **label_counts(metas),
        "errors": errors,
        "image_stats": stats,
    }
    atomic_write_json(out / STATE_DIR / f"{plan.name}.json", record)
    return record


def _write_shard_task(task: tuple[Path, ShardPlan, PackSettings]) -> dict:
    return _write_shard(*task)


def _load_state(out: Path, settings: PackSettings, source_sha: str) -> dict[str, dict]:
    """Records of shards finished by an earlier run with the same settings and source."""
    state = out / STATE_DIR
    key = {"settings": settings.fingerprint(), "source_sha256": source_sha}
    settings_file = state / "settings.json"
    if settings_file.is_file():
        if json.loads(settings_file.read_text()) != key:
            raise ChexdistError(
                f"{out}: holds shards packed with other settings or another CSV; use a new --out or delete it"
            )
    elif any(out.glob("*.tar")):
        raise ChexdistError(f"{out}: holds shards that chexdist did not write here; use a new --out or delete it")
    atomic_write_json(settings_file, key)
    done = {}
    for path in state.glob("*.tar.json"):
        record = json.loads(path.read_text())
        shard = out / record["name"]
        if shard.is_file() and shard.stat().st_size == record["bytes"]:
            done[record["name"]] = record
    return done


def _prepare(root, out, settings: PackSettings, workers: int):
    """Shared by a whole pack, one array task and the merge: the deterministic shard plan and the
    records of shards already finished (by any process, in any earlier run)."""
    settings.validate()
    if workers < 1:
        raise ChexdistError(f"--workers {workers} must be >= 1")
    release = read_dataset(root, settings)
    out = Path(out)
    source_sha = next(iter(release.sources.values()))
    plans, missing = plan_shards(release, settings)
    out.mkdir(parents=True, exist_ok=True)  # only once the plan stands: a refused pack leaves no folder
    done = _load_state(out, settings, source_sha)
    return release, out, source_sha, plans, missing, done


def _pack_plans(out: Path, todo: list[ShardPlan], settings: PackSettings, workers: int, progress: bool, done: dict) -> None:
    from tqdm.auto import tqdm

    total = sum(len(p.rows) for p in todo)
    bar = tqdm(total=total, desc=f"pack {out.name}", unit="img", disable=not (progress and interactive()) or total == 0)
    # Largest first (a split's last, smaller shard goes last): the pool's tail, where one worker
    # finishes alone, is then as short as whole-shard tasks allow.
    tasks = [(out, plan, settings) for plan in sorted(todo, key=lambda plan: len(plan.rows), reverse=True)]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(todo) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, len(todo))))
            records = pool.map(_write_shard_task, tasks)
        else:
            records = map(_write_shard_task, tasks)
        for record in records:
            done[record["name"]] = record
            bar.update(record["samples"] + len(record["errors"]))
    bar.close()


def _finish(out: Path, release: DatasetTable, settings: PackSettings, source_sha: str, plans: list[ShardPlan],
            missing: pd.DataFrame, done: dict) -> dict:
    records = [done[p.name] for p in plans]
    listed_missing = [] if settings.only_present else [
        {"image": image, "path": None, "split": None, "reason": "missing: listed in the CSV, no file under --root"}
        for image in missing["image"]
    ]
    errors = listed_missing + [e for r in records for e in r["errors"]]
    atomic_write_jsonl(out / ERRORS, errors)
    manifest = build_manifest(release, settings, source_sha, records, errors)
    manifest["missing"] = {
        "rows": len(missing),
        "by_folder": release.missing_by_folder if len(missing) else {},
        "in_errors": not settings.only_present,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def pack_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    settings: PackSettings = PackSettings(),
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Pack (or finish packing) `root` (a `settings.dataset` download) into `out`; returns the manifest."""
    release, out, source_sha, plans, missing, done = _prepare(root, out, settings, workers)
    (out / MANIFEST).unlink(missing_ok=True)
    todo = [p for p in plans if p.name not in done]
    for stale in out.glob(".*.tar.tmp"):
        stale.unlink()
    _pack_plans(out, todo, settings, workers, progress, done)
    return _finish(out, release, settings, source_sha, plans, missing, done)


def task_record_name(task_index: int, num_tasks: int) -> str:
    return f"task-{task_index:05d}-of-{num_tasks:05d}.json"


def pack_task(
    root: str | os.PathLike,
    out: str | os.PathLike,
    settings: PackSettings,
    task_index: int,
    num_tasks: int,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """One task of an array job (e.g. SLURM's): pack the planned shards i with i % num_tasks ==
    task_index, record them in `.pack/task-I-of-N.json`, write no manifest. Tasks share nothing but
    the folder; `merge_tasks` then writes the manifest. Resumable like a whole pack."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ChexdistError(f"--task-index {task_index} must be in 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    release, out, source_sha, plans, missing, done = _prepare(root, out, settings, workers)
    (out / MANIFEST).unlink(missing_ok=True)
    mine = [p for i, p in enumerate(plans) if i % num_tasks == task_index]
    todo = [p for p in mine if p.name not in done]
    for plan in todo:  # only this task's leftovers: other tasks may be writing theirs right now
        (out / f".{plan.name}.tmp").unlink(missing_ok=True)
    _pack_plans(out, todo, settings, workers, progress, done)
    record = {
        "task_index": task_index,
        "num_tasks": num_tasks,
        "shards": [p.name for p in mine],
        "samples": sum(done[p.name]["samples"] for p in mine),
        "errors": sum(len(done[p.name]["errors"]) for p in mine),
    }
    atomic_write_json(out / STATE_DIR / task_record_name(task_index, num_tasks), record)
    return record


def merge_tasks(
    root: str | os.PathLike,
    out: str | os.PathLike,
    settings: PackSettings,
    num_tasks: int | None = None,
) -> dict:
    """After all `pack_task`s: check that every planned shard is recorded and its bytes match the
    record (sha256), then write errors.jsonl and the manifest, exactly as a whole pack would."""
    if not (Path(out) / STATE_DIR / "settings.json").is_file():
        raise ChexdistError(f"{out}: no pack task has run here (no {STATE_DIR}/settings.json); run the array tasks first")
    release, out, source_sha, plans, missing, done = _prepare(root, out, settings, 1)
    absent = [(i, p.name) for i, p in enumerate(plans) if p.name not in done]
    if absent:
        tasks = sorted({i % num_tasks for i, _ in absent}) if num_tasks else []
        which = f" (from task(s) {', '.join(map(str, tasks))} of {num_tasks})" if tasks else ""
        raise ChexdistError(
            f"{out}: {len(absent)} of {len(plans)} shards are not packed, e.g. {absent[0][1]}{which}; "
            "rerun those tasks, then --merge"
        )
    for plan in plans:
        if sha256_file(out / plan.name) != done[plan.name]["sha256"]:
            raise ChexdistError(f"{out / plan.name}: sha256 differs from its record in {STATE_DIR}/; delete the shard and rerun its task")
    return _finish(out, release, settings, source_sha, plans, missing, done)
