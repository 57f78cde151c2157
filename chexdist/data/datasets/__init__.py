"""The datasets `chexdist pack --dataset NAME` reads (one module each; the interface is in
:mod:`chexdist.data.datasets.base`). Modules are imported on use, so a dataset whose module is
absent from an install fails with one line when asked for, and nothing else."""

from __future__ import annotations

import importlib

from chexdist.data.datasets.base import Dataset
from chexdist.errors import ChexdistError

REGISTRY = {
    "nih": "chexdist.data.datasets.nih",
    "chexpert": "chexdist.data.datasets.chexpert",
    "mimic": "chexdist.data.datasets.mimic",
    "padchest": "chexdist.data.datasets.padchest",
    "vindr": "chexdist.data.datasets.vindr",
    "csv": "chexdist.data.datasets.csvtable",
    "dicom": "chexdist.data.datasets.dicom",
}


def get_dataset(name: str) -> Dataset:
    """The reader registered as `name`; an unknown name lists the known ones."""
    if name not in REGISTRY:
        raise ChexdistError(f"unknown --dataset {name!r}; known datasets: {', '.join(REGISTRY)}")
    try:
        module = importlib.import_module(REGISTRY[name])
    except ModuleNotFoundError as exc:
        if exc.name != REGISTRY[name]:
            raise
        raise ChexdistError(f"--dataset {name}: its reader ({REGISTRY[name]}) is not part of this install") from None
    return module.DATASET


def available() -> dict[str, Dataset]:
    """Every registered reader this install has (for `chexdist pack --help` and its options)."""
    found = {}
    for name in REGISTRY:
        try:
            found[name] = get_dataset(name)
        except ChexdistError:
            continue
    return found
