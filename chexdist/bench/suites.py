"""`chexdist bench NAME`: performance suites, each printing one JSON object per result line.

A suite is a function in SUITES taking keyword options and yielding result dicts; `run_suite`
prints them as they come, so a long suite shows progress and a killed run keeps its finished lines.
Results are ratios measured within one run (the Performance contract), plus the raw figures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from chexdist.bench.app import app_suite
from chexdist.bench.loader import loader_suite
from chexdist.bench.loop import train_suite
from chexdist.bench.packing import pack_suite
from chexdist.bench.reads import reads_suite
from chexdist.bench.resume import resume_suite
from chexdist.bench.tune import tune_suite
from chexdist.errors import ChexdistError
from chexdist.utils.fileio import dumps_json

SUITES: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "loader": loader_suite, "pack": pack_suite, "train": train_suite, "resume": resume_suite, "reads": reads_suite,
    "tune": tune_suite, "app": app_suite,
}


def run_suite(name: str, out=sys.stdout, **options: Any) -> list[dict[str, Any]]:
    """Run suite `name`, printing each result as one JSON line as soon as it is measured."""
    if name not in SUITES:
        raise ChexdistError(f"unknown bench {name!r}; choose one of {', '.join(SUITES)}")
    results = []
    for result in SUITES[name](**options):
        print(dumps_json(result), file=out, flush=True)
        results.append(result)
    return results
